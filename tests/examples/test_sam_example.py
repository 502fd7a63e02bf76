"""The README's SAM example (examples/sam_mona.py) on a tiny SAM built from segment_anything's constructors."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch

import monatune
from monatune.data.segmentation import read_masks, segmentation_transforms

pytest.importorskip("segment_anything")
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer  # noqa: E402
from shapes_segmentation import write_ade  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sam_mona.py"


def _example():
    spec = importlib.util.spec_from_file_location("sam_mona_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_sam() -> Sam:
    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,),
                              window_size=2, out_chans=32, use_rel_pos=True)  # fmt: skip
    prompts = PromptEncoder(embed_dim=32, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=8)
    decoder = MaskDecoder(transformer_dim=32, transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64,
                          num_heads=2), num_multimask_outputs=3, iou_head_depth=1, iou_head_hidden_dim=16)  # fmt: skip
    return Sam(encoder, prompts, decoder, pixel_mean=[123.7, 116.3, 103.5], pixel_std=[58.4, 57.1, 57.4])


def test_mona_in_the_encoder_and_the_mask_decoder_learn_the_masks(tmp_path):
    example = _example()
    root = write_ade(tmp_path, n_train=4, n_val=1, size=(64, 64)) / "ADEChallengeData2016"
    data = read_masks(root, "training", classes=["square", "disc", "triangle"], masks="annotations",
                      reduce_zero_label=True,  # fmt: skip
                      transforms=segmentation_transforms(True, crop_size=64, scale=(128, 64), ratio_range=(1.0, 1.0),
                                                         photometric=False, mean=None))  # fmt: skip
    sam = tiny_sam()
    before = copy.deepcopy(sam.state_dict())
    torch.manual_seed(0)
    history = example.train(sam, data, epochs=30, lr=2e-3, batch_size=1)  # a plateau first: the tiny decoder starts flat
    assert min(history[-3:]) < 0.7 * history[0], history
    after = sam.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("mask_decoder.") for k in changed)  # base weights: only the decoder moved
    adapters = [name for name, _, _ in monatune.adapter_modules(sam)]
    assert adapters and all(name.startswith("image_encoder.blocks.") for name in adapters)
    assert not any(p.requires_grad for p in sam.prompt_encoder.parameters())

    monatune.save_adapter(sam, tmp_path / "adapter")
    fresh = monatune.load_adapter(tiny_sam(), tmp_path / "adapter")
    image, mask = data[0]
    sam.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(example.sam_step(fresh, image[None], mask[None]), example.sam_step(sam, image[None], mask[None]))


def test_class_prompts_give_each_class_its_box_and_skip_ignored_pixels():
    example = _example()
    mask = torch.full((6, 8), 255)
    mask[1:3, 2:5] = 0
    mask[4, 7] = 2
    prompts = list(example.class_prompts(mask))
    assert [b.tolist() for b, _ in prompts] == [[2.0, 1.0, 5.0, 3.0], [7.0, 4.0, 8.0, 5.0]]
    assert [int(t.sum()) for _, t in prompts] == [6, 1]
