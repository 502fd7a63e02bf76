"""Packed token layouts: several images of different sizes in one sequence, each filtered on its own grid."""
import pytest
import timm
import torch

import monatune
from monatune.adapters.mona import Mona


def _embed(vit, image):
    return vit._pos_embed(vit.patch_embed(image))  # (1, 1 + h*w, C) with the class token first


def test_mona_filters_each_packed_image_on_its_own_grid():
    torch.manual_seed(0)
    mona = Mona(16, bottleneck=8).eval()
    with torch.no_grad():
        for p in mona.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    a, b = torch.randn(1, 1 + 3 * 5, 16), torch.randn(1, 1 + 4 * 2, 16)
    packed = mona(torch.cat([a, b], 1), hw=[(3, 5), (4, 2)], num_prefix_tokens=1)
    separate = torch.cat([mona(a, hw=(3, 5), num_prefix_tokens=1), mona(b, hw=(4, 2), num_prefix_tokens=1)], 1)
    torch.testing.assert_close(packed, separate, rtol=0, atol=1e-6)
    # one grid over all tokens would mix the images: the packed result differs from it
    assert not torch.allclose(packed[:, 16:], mona(b, hw=(2, 4), num_prefix_tokens=1), atol=1e-4)
    with pytest.raises(ValueError, match=r"2 packed images with grids \[\(3, 5\), \(4, 2\)\] and 1 prefix tokens each have 25"):
        mona(torch.randn(1, 24, 16), hw=[(3, 5), (4, 2)], num_prefix_tokens=1)


def test_a_packed_sequence_through_tuned_vit_blocks_equals_each_image_alone():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=32, num_heads=2,
                            dynamic_img_size=True, num_classes=0).eval()  # fmt: skip
    monatune.apply(vit, "mona", bottleneck=8)
    with torch.no_grad():
        for _, _, adapter in monatune.adapter_modules(vit):
            for p in adapter.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    images = [torch.randn(1, 3, 48, 80), torch.randn(1, 3, 64, 32)]
    grids = [(3, 5), (4, 2)]
    with torch.no_grad():
        alone = []
        for image, grid in zip(images, grids):
            x = _embed(vit, image)
            for block in vit.blocks:
                x = block(x)
            alone.append(x)
        seqs = [_embed(vit, image) for image in images]
        sizes = [s.shape[1] for s in seqs]
        mask = torch.block_diag(*[torch.ones(n, n, dtype=torch.bool) for n in sizes])  # images attend to themselves
        monatune.set_token_grid(vit, grids, num_prefix_tokens=1)
        x = torch.cat(seqs, 1)
        for block in vit.blocks:
            x = block(x, attn_mask=mask)
        monatune.set_token_grid(vit, None)
    torch.testing.assert_close(x, torch.cat(alone, 1), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # unpinned, the patch embedding's hook sets the grid again
        assert vit(torch.randn(1, 3, 32, 48)).shape == (1, 32)


def test_set_token_grid_needs_tuned_token_blocks():
    with pytest.raises(ValueError, match="no tuned ViT blocks"):
        monatune.set_token_grid(torch.nn.Linear(2, 2), [(1, 1)])
