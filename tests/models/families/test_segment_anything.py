"""segment_anything's SAM (models/segment_anything_sam.py): the image encoder's tuned block, the methods that
apply, and a whole Sam whose prompt encoder and mask decoder are left alone unless named as heads."""
from __future__ import annotations

import pytest
import torch
from family_checks import check_identity, check_round_trip, check_training_step
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import Tensor

import monatune
from monatune.methods import METHODS

METHODS_THAT_APPLY = ["full", "fixed", "bitfit", "norm", "partial-1", "ssf", "lora", "mona", "adapter", "adaptformer",
                      "lorand"]  # fmt: skip
X = torch.randn(2, 3, 64, 64)
IMAGES = [torch.rand(3, 64, 64) * 255, torch.rand(3, 64, 64) * 255]
BOXES = [torch.tensor([[8.0, 10.0, 40.0, 50.0]]), torch.tensor([[20.0, 4.0, 60.0, 30.0], [0.0, 0.0, 63.0, 63.0]])]


def make_encoder() -> ImageEncoderViT:
    """A tiny image encoder: a 4 x 4 map, block 0 in 3 x 3 windows (padded to 6 x 6), block 1 global. Position
    embeddings start at zero in segment_anything; random here, so that they shape the outputs."""
    encoder = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,),
                              window_size=3, out_chans=32, use_rel_pos=True)  # fmt: skip
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "pos" in name:
                p.normal_(0.0, 0.1)
    return encoder


def make_sam(cls: type[Sam] = Sam) -> Sam:
    transformer = TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2)
    return cls(
        make_encoder(),
        PromptEncoder(embed_dim=32, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=8),
        MaskDecoder(transformer_dim=32, transformer=transformer, num_multimask_outputs=3, iou_head_depth=1,
                    iou_head_hidden_dim=16),  # fmt: skip
    )


class TrainableSam(Sam):
    """``Sam.forward`` runs without gradients and keeps only the masks asked for; training runs the same
    parts with gradients and keeps every mask output (so every mask token and hypernetwork is used)."""

    def forward(  # type: ignore[override]
        self, images: list[Tensor], boxes: list[Tensor]
    ) -> list[tuple[Tensor, Tensor]]:  # per image: masks (N, 4, 16, 16) and their IoU predictions (N, 4)
        embeddings = self.image_encoder(torch.stack([self.preprocess(image) for image in images]))
        pe = self.prompt_encoder.get_dense_pe()
        out = []
        for embedding, box in zip(embeddings, boxes):
            sparse, dense = self.prompt_encoder(points=None, boxes=box, masks=None)
            out.append(self.mask_decoder.predict_masks(embedding[None], pe, sparse, dense))
        return out


def batched_input() -> list[dict]:
    return [{"image": image, "original_size": (64, 64), "boxes": box} for image, box in zip(IMAGES, BOXES)]


def test_identity_adapters_change_nothing():
    check_identity(make_encoder(), X, "mona")
    check_identity(make_encoder(), X, "lora", modules=["q", "k", "v", "proj", "fc1", "fc2"])


@pytest.mark.parametrize("method", METHODS_THAT_APPLY)
def test_training_step_changes_exactly_the_method_params(method):
    check_training_step(make_encoder, method, X, last_block="blocks.1")


def test_lora_on_every_projection_trains():
    model = check_training_step(make_encoder, "lora", X, modules=("q", "k", "v", "proj", "fc1", "fc2"), rank=2)
    hosts = sorted(name.rsplit(".lora.", 1)[0] for name, _, _ in monatune.adapter_modules(model))
    assert hosts == [f"blocks.{i}.{p}" for i in range(2) for p in ("attn.proj", "attn.qkv", "mlp.lin1", "mlp.lin2")]


def test_methods_are_all_known_and_vpt_is_refused():
    assert set(METHODS) - set(METHODS_THAT_APPLY) == {"vpt"}
    model = make_sam()
    with pytest.raises(ValueError, match="vpt needs tokens.*segment_anything SAM image encoder"):
        monatune.apply(model, "vpt")
    assert not monatune.is_tuned(model)


@pytest.mark.parametrize("method", ["mona", "lora"])
def test_whole_sam_tuned_in_its_image_encoder_only(method):
    model = check_identity(make_sam(), (batched_input(), False), method)  # Sam's own forward, box prompts
    hosts = {".".join(name.split(".")[:3]) for name, _, _ in monatune.adapter_modules(model)}
    assert hosts == {"image_encoder.blocks.0", "image_encoder.blocks.1"}
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("image_encoder.blocks."))


@pytest.mark.parametrize("head", [(), ("mask_decoder",)])
def test_whole_sam_trains_the_heads_named(head):
    model = check_training_step(lambda: make_sam(TrainableSam), "mona", (IMAGES, BOXES), head=head)
    decoder_trains = {p.requires_grad for p in model.mask_decoder.parameters()}
    assert decoder_trains == {bool(head)}
    assert not any(p.requires_grad for p in model.prompt_encoder.parameters())
    assert not any(p.requires_grad for p in model.image_encoder.neck.parameters())


@pytest.mark.parametrize("method", ["mona", "lora"])
def test_adapter_round_trip(method, tmp_path):
    check_round_trip(make_encoder(), method, X, tmp_path)
