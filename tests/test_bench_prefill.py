"""The prefill benchmark (autoselect.bench.prefill): every timed pruned call pays for its selection
(apply's memo must not reuse the last one), and the ceiling row is the unpatched model on K image tokens."""

import autoselect
from autoselect.bench import prefill


def test_every_timed_call_runs_the_selection(monkeypatch):
    selector = autoselect.AutoSelector(64, denoiser=None)
    calls = []
    select = selector.select
    monkeypatch.setattr(selector, "select", lambda *a, **k: calls.append(1) or select(*a, **k))
    rows = prefill.run(hidden=64, layers=1, text=8, image=32, repeats=3, keeps=(8, ), methods=("autoselect", ),
                       selector=selector)
    # one call to size the KV cache, one warm-up, three timed: each one scores the image again
    assert len(calls) == 5
    by_provider = {r["provider"]: r for r in rows}
    assert set(by_provider) == {"full", "ceiling", "autoselect"}
    assert "(40 tokens)" in by_provider["full"]["note"]
    assert "(16 tokens)" in by_provider["ceiling"]["note"] and "(16 tokens)" in by_provider["autoselect"]["note"]
    assert all(r["median_ms"] > 0 for r in rows)


def test_shape_takes_an_optional_batch_that_reaches_the_inputs(monkeypatch):
    assert prefill.parse_shape("64,1,8,32") == {"hidden": 64, "layers": 1, "text": 8, "image": 32}
    kwargs = prefill.parse_shape("64,1,8,32,3")
    assert kwargs["batch"] == 3
    for bad in ("64,1,8", "64,1,8,32,3,1", "64,1,8,32,0"):
        try:
            prefill.parse_shape(bad)
        except ValueError as e:
            assert "hidden,layers,text,image,batch" in str(e)
        else:
            raise AssertionError(f"{bad!r} was accepted")
    batches = []
    make_inputs = prefill.make_inputs
    monkeypatch.setattr(prefill, "make_inputs", lambda *a, **k: batches.append(make_inputs(*a, **k)) or batches[-1])
    rows = prefill.run(**kwargs, repeats=1, keeps=(8, ), methods=("norm", ))
    assert {r["shape"] for r in rows} == {"3x(8+32) h64 L1"}
    # the full prompts and the ceiling's shortened ones, each a batch of 3 with 3 images
    assert [tuple(b["input_ids"].shape) for b in batches] == [(3, 40), (3, 16)]
    assert all(len(b["mm_encoder_outputs"]["image"].pooler_output) == 3 for b in batches)
