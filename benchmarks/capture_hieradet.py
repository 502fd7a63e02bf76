"""Dynamo capture of a tiny Mona-tuned model at several sizes (counting backend): seconds for each first call, the
largest difference from eager, graphs so far. Run by hand on 2026-12-05 (docs/benchmarks.md, issue 21)."""
import torch, time, monatune
from torch._dynamo.testing import CompileCounter
TINY_DET = dict(embed_dim=16, num_heads=1, stages=(1, 2, 1, 1), global_att_blocks=(2,), window_spec=(4, 4, 4, 2))
torch.manual_seed(0)
b = monatune.build_dense_backbone("sam2_hiera_tiny", "mona", bottleneck=8, model_kwargs=TINY_DET).eval()
print("pad_to", b.pad_to)
g = CompileCounter(); c = torch.compile(b, dynamic=True, backend=g)
with torch.no_grad():
    for size in [(128, 160), (97, 131), (256, 128), (200, 136)]:
        t = time.time(); x = torch.randn(1, 3, *size); e = b(x); o = c(x)
        print(size, round(time.time() - t, 1), max((o[k] - e[k]).abs().max().item() for k in e), g.frame_count, flush=True)
