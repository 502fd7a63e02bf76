"""Weight decay as the release's optimiser builds it: mmcv 1.x paramwise_cfg on the release's parameter names."""
from pathlib import Path

import pytest
import yaml
from torch import nn

from monatune.engine.decay import check_paramwise, mmcv_param_groups
from monatune.tasks import ImageClassifier, ObjectDetector, SemanticSegmenter

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 1, 1, 1))


def config_rule(path: str, method: str = "mona") -> dict | None:
    init = yaml.safe_load((ROOT / "configs" / path).read_text())["model"]["init_args"]
    return (init.get("paramwise_by_method") or {}).get(method, init.get("paramwise"))


def mmcv_by_hand(release_name: str, local: str, kind: str, cfg: dict, base_wd: float) -> float:
    """mmcv 1.x DefaultOptimizerConstructor.add_params, written out for one parameter."""
    keys = cfg.get("custom_keys", {})
    for key in sorted(sorted(keys), key=len, reverse=True):
        if key in release_name:
            value = keys[key]
            return base_wd * (value if isinstance(value, float) else value.get("decay_mult", 1.0))
    if kind == "norm":
        return base_wd * cfg.get("norm_decay_mult", 1.0)
    if kind == "dwconv":
        return base_wd * cfg.get("dwconv_decay_mult", 1.0)
    if local == "bias":
        return base_wd * cfg.get("bias_decay_mult", 1.0)
    return base_wd


# monatune name -> the release's name for the same parameter, and what kind of module holds it
DETECTION = {
    "backbone.body.layers.0.blocks.0.after_attn.default.gamma": ("backbone.layers.0.blocks.0.my_module_1.gamma", "other"),
    "backbone.body.layers.0.blocks.0.after_attn.default.gammax": ("backbone.layers.0.blocks.0.my_module_1.gammax", "other"),
    "backbone.body.layers.0.blocks.0.after_attn.default.norm.weight": ("backbone.layers.0.blocks.0.my_module_1.norm.weight", "norm"),
    "backbone.body.layers.0.blocks.0.after_mlp.default.project1.bias": ("backbone.layers.0.blocks.0.my_module_2.project1.bias", "other"),
    "backbone.body.layers.2.blocks.1.after_mlp.default.adapter_conv.conv1.bias": (
        "backbone.layers.2.blocks.1.my_module_2.adapter_conv.conv1.bias", "dwconv"),
    "backbone.body.layers.2.blocks.1.after_mlp.default.adapter_conv.projector.bias": (
        "backbone.layers.2.blocks.1.my_module_2.adapter_conv.projector.bias", "other"),
    "backbone.fpn.inner_blocks.0.0.bias": ("neck.lateral_convs.0.conv.bias", "other"),
    "roi_heads.stages.0.head.0.1.weight": ("roi_head.bbox_head.0.shared_convs.0.bn.weight", "norm"),
    "roi_heads.stages.2.predictor.bbox_pred.bias": ("roi_head.bbox_head.2.fc_reg.bias", "other"),
}
FULL_EXTRA = {
    "backbone.body.layers.0.blocks.0.norm1.weight": ("backbone.layers.0.blocks.0.norm1.weight", "norm"),
    "backbone.body.layers.0.blocks.0.attn.relative_position_bias_table": (
        "backbone.layers.0.blocks.0.attn.relative_position_bias_table", "other"),
    "backbone.body.layers.0.blocks.0.attn.qkv.bias": ("backbone.layers.0.blocks.0.attn.qkv.bias", "other"),
}
SEGMENTATION = {
    "backbone.layers.0.blocks.0.after_attn.default.norm.weight": ("backbone.layers.0.blocks.0.my_module_1.norm.weight", "norm"),
    "backbone.layers.0.blocks.0.after_attn.default.gamma": ("backbone.layers.0.blocks.0.my_module_1.gamma", "other"),
    "decode_head.psp_modules.0.1.1.weight": ("decode_head.psp_modules.0.1.bn.weight", "norm"),
    "aux_head.convs.0.1.bias": ("auxiliary_head.convs.0.bn.bias", "norm"),
}
SEG_FULL_EXTRA = {
    "backbone.layers.0.blocks.0.norm1.weight": ("backbone.layers.0.blocks.0.norm1.weight", "norm"),
    "backbone.norm0.weight": ("backbone.norm0.weight", "norm"),
}


def decays(task, cfg: dict) -> dict[str, float]:
    groups = mmcv_param_groups(task.model, 1e-4, task.weight_decay, cfg, task.release_name)
    return {name: g["weight_decay"] for g in groups for name in g["names"]}


def by_monatune_name(task, cfg: dict) -> dict[str, float]:
    """The decay of each parameter, keyed by its name in monatune's network."""
    release = {task.release_name(n): n for n, _ in task.model.named_parameters()}
    return {release[r]: wd for r, wd in decays(task, cfg).items()}


def check(task, table: dict, cfg: dict, base_wd: float) -> None:
    got = by_monatune_name(task, cfg)
    for name, (release_name, kind) in table.items():
        local = name.rsplit(".", 1)[1]
        assert task.release_name(name).rsplit(".", 1)[1] == release_name.rsplit(".", 1)[1]
        assert got[name] == pytest.approx(mmcv_by_hand(release_name, local, kind, cfg, base_wd)), name


@pytest.mark.parametrize("method", ["mona", "full"])
def test_coco_groups_follow_mmcv_on_the_release_names(method):
    det = ObjectDetector("swin_tiny_patch4_window7_224", detector="cascade_mask_rcnn", num_classes=3, method=method,
                         model_kwargs=TINY, fpn_channels=16, detector_kwargs={"head_channels": 16})  # fmt: skip
    det.configure_model()
    cfg = config_rule("det/coco_cascade_mask_rcnn_swin_b_3x.yaml", method)
    table = DETECTION if method == "mona" else {**FULL_EXTRA, **{k: v for k, v in DETECTION.items() if "default" not in k}}
    check(det, table, cfg, 0.05)
    got = by_monatune_name(det, cfg)
    if method == "mona":  # biases, head BatchNorm and Mona's scales decay; names with 'norm' do not
        assert got["backbone.body.layers.0.blocks.0.after_attn.default.gamma"] == 0.05
        assert got["roi_heads.stages.0.head.0.1.weight"] == 0.05
        assert got["backbone.body.layers.0.blocks.0.after_attn.default.norm.weight"] == 0.0
    else:
        assert got["backbone.body.layers.0.blocks.0.attn.relative_position_bias_table"] == 0.0
        assert got["backbone.body.layers.0.blocks.0.attn.qkv.bias"] == 0.05


@pytest.mark.parametrize("method", ["mona", "full"])
def test_ade20k_mona_decays_everything_full_spares_norms(method):
    seg = SemanticSegmenter("swin_tiny_patch4_window7_224", num_classes=4, method=method, model_kwargs=TINY,
                            channels=16, aux_channels=8, weight_decay=0.01)  # fmt: skip
    seg.configure_model()
    cfg = config_rule("seg/ade20k_upernet_swin_l.yaml", method)
    check(seg, SEGMENTATION if method == "mona" else {**SEG_FULL_EXTRA, **{k: v for k, v in SEGMENTATION.items()
                                                                        if "default" not in k}}, cfg, 0.01)
    got = by_monatune_name(seg, cfg)
    backbone = {n: wd for n, wd in got.items() if n.startswith("backbone.")}
    if method == "mona":  # the 'backbone' key wins over 'norm': every trainable parameter decays at 0.01
        assert set(got.values()) == {0.01}
    else:
        assert backbone["backbone.layers.0.blocks.0.norm1.weight"] == 0.0
        assert got["decode_head.psp_modules.0.1.1.weight"] == 0.01  # heads' BatchNorm ('bn') decays


def test_classification_rule_spares_norms_and_biases_but_not_depthwise_biases_or_scales():
    clf = ImageClassifier("swin_tiny_patch4_window7_224", num_classes=5, method="mona", model_kwargs=TINY)
    clf.configure_model()
    cfg = config_rule("cls/flowers102_swin_l.yaml")
    got = by_monatune_name(clf, cfg)
    mona = "layers.0.blocks.0.after_attn.default."
    assert got[mona + "adapter_conv.conv1.bias"] == 0.05  # depthwise conv: mmcv's dwconv rule comes before bias
    assert got[mona + "adapter_conv.projector.bias"] == 0.0
    assert got[mona + "project1.bias"] == 0.0 and got[mona + "norm.weight"] == 0.0
    assert got[mona + "gamma"] == 0.05 and got["head.fc.weight"] == 0.05 and got["head.fc.bias"] == 0.0


def test_default_rule_is_timms_and_configured_rule_reaches_the_optimiser():
    seg = SemanticSegmenter("swin_tiny_patch4_window7_224", num_classes=4, method="mona", model_kwargs=TINY,
                            channels=16, aux_channels=8, weight_decay=0.01,
                            paramwise={"custom_keys": {"norm": 0.0}})  # fmt: skip
    seg.configure_model()
    seg._schedule_length = lambda: (10, 10)
    optimizer = seg.configure_optimizers()["optimizer"]
    by_param = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(seg.model.named_parameters())
    assert by_param[id(named["backbone.layers.0.blocks.0.after_attn.default.gamma"])] == 0.01  # timm: 0 (1-D)
    assert by_param[id(named["backbone.layers.0.blocks.0.after_attn.default.norm.weight"])] == 0.0
    plain = SemanticSegmenter("swin_tiny_patch4_window7_224", num_classes=4, method="mona", model_kwargs=TINY,
                              channels=16, aux_channels=8)  # fmt: skip
    plain.configure_model()
    plain._schedule_length = lambda: (10, 10)
    optimizer = plain.configure_optimizers()["optimizer"]
    by_param = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(plain.model.named_parameters())
    assert by_param[id(named["backbone.layers.0.blocks.0.after_attn.default.gamma"])] == 0.0


def test_longest_key_first_and_bad_rules():
    model = nn.Sequential(nn.LayerNorm(4))
    groups = mmcv_param_groups(model, 1.0, 0.1, {"custom_keys": {"0": 0.5, "0.weight": 0.0}})
    assert {n: g["weight_decay"] for g in groups for n in g["names"]} == {"0.weight": 0.0, "0.bias": pytest.approx(0.05)}
    with pytest.raises(ValueError, match="unknown paramwise"):
        check_paramwise({"keys": {}})
    with pytest.raises(ValueError, match="custom key 'norm'"):
        check_paramwise({"custom_keys": {"norm": "none"}})
