"""Command line: `autoselect info | bench | train | eval | ablate | show | demo` (also `python -m autoselect`).

  info   versions, what is built, which backend each op uses on each device and why others are missing
  bench  benchmarks of the ops that exist, as a table; rows appended to CSV files with --results
  train  train an AutoSelector on a frozen VLM (autoselect.training.trainer)
  eval   accuracy of the full model, AutoSelect and the baselines at several budgets, with paired-bootstrap
         intervals of each difference to AutoSelect and to the full model (autoselect.evaluation)
  ablate train each ablation variant (one option changed) and evaluate it against the full variant
         (autoselect.ablate)
  show   a PNG of the visual tokens each method keeps (autoselect.show)
  demo   the shipped tiny VLM and selector: accuracy table, prefill speed-up, picture (autoselect.demo)
"""

import argparse
import importlib
import os
import platform
import sys

import torch


def _version_of(module_name: str) -> str:
    try:
        return importlib.import_module(module_name).__version__
    except Exception as exc:
        return f"not available ({type(exc).__name__}: {exc})"


def info_lines():
    """The report printed by `autoselect info`, as a list of lines."""
    import autoselect
    from . import _backends, _ext

    lines = [f"autoselect {autoselect.__version__}  ({os.path.dirname(autoselect.__file__)})",
             f"python     {platform.python_version()} on {platform.machine()}",
             f"torch      {torch.__version__}  (CUDA {torch.version.cuda or 'none: a CPU build'})",
             f"triton     {_version_of('triton')}",
             f"transformers {_version_of('transformers')}",
             ""]
    build = _ext.build_info()
    if build is None:
        lines.append(f"extension  autoselect._C: not loaded. {_ext.extension_error()}")
    else:
        cuda = f"yes, archs {build['cuda_archs']}" if build["cuda"] else "no"
        lines.append(f"extension  autoselect._C {build['version']}: C++ CPU kernels; CUDA kernels: {cuda}; "
                     f"built against torch {build['torch_version']}")
        if build["torch_version"] != torch.__version__:
            lines.append(f"           warning: built against torch {build['torch_version']}, running {torch.__version__}; "
                         "rebuild with `pip install --no-build-isolation -e .`")
    if _ext.triton_kernels() is None:
        lines.append(f"triton kernels: not usable. {_ext.triton_error()}")
    else:
        mode = "interpreter (TRITON_INTERPRET=1)" if _ext.triton_interpreting() else "compiled (needs a GPU)"
        lines.append(f"triton kernels: importable, {mode}")
    forced = os.environ.get("AUTOSELECT_BACKEND")
    if forced:
        lines.append(f"AUTOSELECT_BACKEND={forced} (forced)")
    lines.append("")

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        lines.append(f"GPU: {torch.cuda.get_device_name(0)} (compute capability "
                     f"{'.'.join(map(str, torch.cuda.get_device_capability(0)))})")
    else:
        reason = "torch has no CUDA" if torch.version.cuda is None else "no CUDA device visible"
        lines.append(f"GPU: none ({reason})")
    header = f"{'op':<14} {'device':<6} {'chosen':<10} {'available':<24} missing"
    lines += [header, "-" * len(header)]
    for device in devices:
        for op, entry in _backends.backends(device).items():
            missing = "; ".join(f"{b}: {why}" for b, why in entry["missing"].items()) or "-"
            lines.append(f"{op:<14} {device:<6} {entry['chosen'] or 'error':<10} "
                         f"{', '.join(entry['available']):<24} {missing}")
            if entry.get("limits"):
                lines.append(f"{'':<14} {'':<6} limits: {entry['limits']}")
    return lines


def cmd_info(args):
    print("\n".join(info_lines()))
    return 0


def _parse_dtype(name: str) -> torch.dtype:
    dtypes = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
              "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose one of {', '.join(dtypes)}")
    return dtypes[name]


def _format_table(rows):
    header = f"{'kernel':<14} {'mode':<19} {'provider':<11} {'backend':<9} {'shape':<20} {'dtype':<9} " \
             f"{'median ms':>10} {'p20':>8} {'p80':>8} {'GB/s':>8}  note"
    out = [header, "-" * len(header)]
    for r in rows:
        number = lambda v, fmt: (fmt.format(v) if isinstance(v, float) else str(v))  # noqa: E731
        out.append(f"{r['kernel']:<14} {r['mode']:<19} {r['provider']:<11} {r['backend']:<9} {r['shape']:<20} "
                   f"{r['dtype']:<9} {number(r.get('median_ms', ''), '{:.3f}'):>10} "
                   f"{number(r.get('p20_ms', ''), '{:.3f}'):>8} {number(r.get('p80_ms', ''), '{:.3f}'):>8} "
                   f"{number(r.get('gbps', ''), '{:.1f}'):>8}  {r.get('note', '')}")
    return out


def _ratio_lines(rows):
    """eager / autoselect time per (kernel, mode, shape, dtype): > 1 means the fused op is faster."""
    times = {}
    for r in rows:
        if isinstance(r.get("median_ms"), float):
            times[(r["kernel"], r["mode"], r["shape"], r["dtype"], r["provider"])] = r["median_ms"]
    lines = []
    for (kernel, mode, shape, dtype, provider), ours in times.items():
        if provider != "autoselect":
            continue
        eager = times.get((kernel, mode, shape, dtype, "eager"))
        if eager:
            lines.append(f"{kernel} {mode:<9} {shape} {dtype}: eager/fused = {eager / ours:.2f}x")
        copy = times.get((kernel, mode, shape, dtype, "copy"))
        if copy:
            lines.append(f"{kernel} {mode:<9} {shape} {dtype}: fused reaches {copy / ours:.0%} of copy bandwidth")
    return lines


def cmd_bench(args):
    from .bench import OPS
    from .bench._timing import append_rows

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = args.shape or (["32,576,4096", "4,576,1024"] if device.type == "cuda" else ["4,576,1024"])
    ops = args.op or list(OPS)
    rows = []
    for op in ops:
        if op not in OPS:
            print(f"unknown op {op!r}; benchmarks exist for {', '.join(OPS)}", file=sys.stderr)
            return 2
        if hasattr(OPS[op], "parse_shape"):  # an op whose shapes are not B,N,D (diag_attention: B,N,H,d,M)
            fields = ",".join(OPS[op].SHAPE_FIELDS)
            parsed = []
            for shape in args.shape or OPS[op].DEFAULT_SHAPES[device.type]:
                try:
                    parsed.append(OPS[op].parse_shape(shape))
                except ValueError:
                    if args.op:  # named explicitly: every --shape must fit it
                        print(f"--shape for {op} takes {fields}, got {shape!r}", file=sys.stderr)
                        return 2
            if not parsed:
                print(f"skipping {op}: no --shape of the form {fields}", flush=True)
            for kwargs in parsed:
                print(f"benchmarking {op} {' '.join(f'{k}={v}' for k, v in kwargs.items())} {dtype} on {device} ...",
                      flush=True)
                rows += OPS[op].run(**kwargs, dtype=dtype, device=device, repeats=args.repeats)
            continue
        for shape in shapes:
            try:
                B, N, D = (int(v) for v in shape.split(","))
            except ValueError:
                print(f"--shape takes B,N,D (e.g. 4,576,1024), got {shape!r}", file=sys.stderr)
                return 2
            print(f"benchmarking {op} B={B} N={N} D={D} {dtype} on {device} ...", flush=True)
            rows += OPS[op].run(B=B, N=N, D=D, dtype=dtype, device=device, repeats=args.repeats)
    print("\n".join(_format_table(rows)))
    print("\n".join(_ratio_lines(rows)))
    if args.results:
        for op in ops:
            if not any(r["kernel"] == op for r in rows):
                continue
            path = os.path.join(args.results, f"{op}.csv")
            append_rows(path, [r for r in rows if r["kernel"] == op])
            print(f"appended {sum(r['kernel'] == op for r in rows)} rows to {path}")
    return 0


# Workflow commands: (name, module under autoselect, help); each module has build_parser(parser) and run(args).
WORKFLOWS = (
    ("train", "training.trainer", "train an AutoSelector on a frozen VLM (its next-token loss only)"),
    ("eval", "evaluation", "accuracy of full, AutoSelect and the baselines at several budgets"),
    ("ablate", "ablate", "train the ablation variants and compare each with the full variant"),
    ("show", "show", "a PNG of the tokens each method keeps"),
    ("demo", "demo", "the shipped tiny VLM and selector: accuracy table, prefill speed-up, picture"),
)


def _workflow(module_name):
    def command(args):
        importlib.import_module(f"{__package__}.{module_name}").run(args)
        return 0
    return command


def build_parser():
    parser = argparse.ArgumentParser(prog="autoselect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, builds and the backend each op uses")
    info.set_defaults(func=cmd_info)
    bench = sub.add_parser("bench", help="benchmark the ops against eager PyTorch")
    bench.add_argument("--op", action="append", help="op to benchmark (repeatable; default: all)")
    bench.add_argument("--shape", action="append", help="B,N,D (repeatable); diag_attention: B,N,H,d,M; "
                       "select: B,N,D,K; prefill: hidden,layers,text,image[,batch]")
    bench.add_argument("--dtype", type=_parse_dtype, help="fp32, fp16 or bf16 (default: fp32 on CPU, bf16 on GPU)")
    bench.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--repeats", type=int, default=20, help="timed repeats per case on the CPU")
    bench.add_argument("--results", help="folder whose <op>.csv files get the rows appended")
    bench.set_defaults(func=cmd_bench)
    for name, module_name, help_text in WORKFLOWS:
        command = sub.add_parser(name, help=help_text)
        importlib.import_module(f"{__package__}.{module_name}").build_parser(command)
        command.set_defaults(func=_workflow(module_name))
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
