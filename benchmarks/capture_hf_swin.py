"""Dynamo capture of a tiny Mona-tuned model at several sizes (counting backend): seconds for each first call, the
largest difference from eager, graphs so far. Run by hand on 2026-12-05 (docs/benchmarks.md, issue 21)."""
import torch, time, monatune, sys
from torch._dynamo.testing import CompileCounter
from transformers import SwinConfig, Swinv2Config
from transformers.models.swin.modeling_swin import SwinModel
from transformers.models.swinv2.modeling_swinv2 import Swinv2Model
WINDOWS = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[1, 2], window_size=4)
make = {"swin": lambda: SwinModel(SwinConfig(**WINDOWS)), "swinv2": lambda: Swinv2Model(Swinv2Config(**WINDOWS))}[sys.argv[1]]
torch.manual_seed(0)
m = monatune.apply(make(), "mona", bottleneck=8).eval()
g = CompileCounter(); c = torch.compile(m, dynamic=True, backend=g)
with torch.no_grad():
    for size in [(64, 96), (72, 88), (97, 131), (128, 64)]:
        t = time.time(); x = torch.randn(1, 3, *size); e = m(x).last_hidden_state; o = c(x).last_hidden_state
        print(size, round(time.time() - t, 1), (o - e).abs().max().item(), g.frame_count, flush=True)
