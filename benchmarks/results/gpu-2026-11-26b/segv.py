import faulthandler, torch, autoselect
faulthandler.enable()
autoselect._ext.extension()
x, alpha, mean, std = torch.randn(2, 8), torch.rand(2), torch.zeros(8), torch.ones(8)
op = torch.ops.autoselect_C.noise_gate_forward
for args in [(x, torch.rand(3), mean, std, None, 0, 0), (x, alpha, mean, std, None, -1, 0)]:
    try:
        op(*args)
        print("no error")
    except RuntimeError as e:
        print("raised:", str(e).splitlines()[0], flush=True)
try:
    torch.ops.autoselect_C.select_topk(torch.randn(2, 8, 4), torch.randn(2, 7), [8, 8], [2, 2])
except RuntimeError as e:
    print("select raised:", str(e).splitlines()[0], flush=True)
print("done")
