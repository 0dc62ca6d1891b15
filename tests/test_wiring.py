"""How the meta-architecture and the trainer wire the losses together, checked against a recomputation.

On a tiny model and a batch built here (not by the data pipeline), the loss of one training step must
equal the loss recomputed from the loss modules (tested on their own in test_losses.py) with targets
built independently in this file: the teacher sees the global crops only, at the *teacher*
temperature, centred with the state the centring had *before* this batch; the student sees its global
crops with the iBOT mask tokens in place and its local crops; DINO pairs every student crop with every
other teacher view; iBOT averages the masked patches of each image; KoLeo is applied per global view.
After ``optimizer.step()`` the teacher must be the EMA of the *updated* student.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_config import TINY

from dinov2.config import load_config
from dinov2.distributed.env import DistEnv
from dinov2.launch.run import build_training
from dinov2.losses import KoLeoLoss
from dinov2.train.meta_arch import SSLMetaArch
from dinov2.train.schedules import ScheduleValues

B = 4  # images; 2B global crops of 16 px (4 x 4 patches of 4 px), 2 local crops per image of 8 px
N_PATCHES = 16
TEACHER_TEMP = 0.05  # != loss.student_temp (0.1): a target made at the wrong temperature shows
STUDENT_TEMP = 0.1
WIRING = TINY + ["model.drop_path_rate=0", f"loss.student_temp={STUDENT_TEMP}", "loss.koleo_weight=0.3"]
WIRING += ["loss.ibot_weight=0.7", "loss.dino_weight=1.3"]  # weights != 1: each term's weight is checked


def _config(extra: list[str] = ()):
    return load_config("train/demo", WIRING + list(extra))


def _masks(every_image: bool) -> torch.Tensor:
    """(2B, 16) masks with a different number of masked patches per crop; with ``every_image=False``
    three crops are left unmasked (the number of masked images is then 5, not 2B = 8)."""
    counts = [3, 5, 2, 7, 4, 6, 8, 1] if every_image else [3, 0, 5, 0, 7, 2, 0, 4]
    g = torch.Generator().manual_seed(3)
    masks = torch.zeros(2 * B, N_PATCHES, dtype=torch.bool)
    for crop, count in enumerate(counts):
        masks[crop, torch.randperm(N_PATCHES, generator=g)[:count]] = True
    return masks


def _batch(every_image: bool = True) -> dict[str, torch.Tensor]:
    """A batch in the collate layout, its mask index and weights built here, not by dinov2.data."""
    g = torch.Generator().manual_seed(1)
    masks = _masks(every_image)
    flat = masks.flatten()
    indices = torch.tensor([i for i in range(flat.numel()) if flat[i]], dtype=torch.long)
    weights = torch.tensor([1.0 / masks[i // N_PATCHES].sum().item() for i in indices.tolist()])
    return {
        "global_crops": torch.randn(2 * B, 3, 16, 16, generator=g),
        "local_crops": torch.randn(2 * B, 3, 8, 8, generator=g),
        "masks": masks,
        "mask_indices": indices,
        "mask_weights": weights,
    }


def _sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int) -> torch.Tensor:
    """The reference DINOv2 Sinkhorn-Knopp (K x B form), one process."""
    q = torch.exp(logits.double() / temp).t()
    n_protos, n_rows = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= n_protos
        q /= q.sum(dim=0, keepdim=True)
        q /= n_rows
    return (q * n_rows).t().float()


def _targets(model: SSLMetaArch, logits: torch.Tensor, centre: torch.Tensor | None, temp: float) -> torch.Tensor:
    if model.loss_cfg.centering == "softmax":
        return torch.softmax((logits - centre) / temp, dim=-1)
    return _sinkhorn_knopp(logits, temp, model.loss_cfg.sk_iterations)


def _dino_reference(student_crops: list[torch.Tensor], teacher_views: list[torch.Tensor]) -> torch.Tensor:
    """Mean over (student crop, teacher view) pairs, a global crop never against its own view."""
    terms = []
    for s, student in enumerate(student_crops):
        for t, target in enumerate(teacher_views):
            if s == t:
                continue
            terms.append(-(target * F.log_softmax(student / STUDENT_TEMP, dim=-1)).sum(-1).mean())
    return torch.stack(terms).mean()


def _ibot_reference(student: torch.Tensor, target: torch.Tensor, masks: torch.Tensor, normaliser: int):
    """Per image: the mean cross-entropy of its masked patches; summed over images, / ``normaliser``."""
    total, row = torch.zeros(()), 0
    for image_mask in masks:
        count = int(image_mask.sum())
        if count:
            ce = -(target[row : row + count] * F.log_softmax(student[row : row + count] / STUDENT_TEMP, dim=-1))
            total = total + ce.sum(-1).mean()
            row += count
    return total / normaliser


def _reference(model: SSLMetaArch, batch: dict, centres: dict | None, ibot_normaliser: int, student_masks=True):
    """Every term of the step recomputed outside the meta-architecture (fp32, no grad)."""
    masks = batch["masks"]
    with torch.no_grad():
        t = model.teacher.backbone(batch["global_crops"])
        t_cls, t_masked = t["cls"], t["patch"][masks]  # (2B, D), (M, D) image by image, patch by patch
        head = model.teacher.dino_head  # shared DINO / iBOT head (ibot_head: null)
        dino_t = _targets(model, head(t_cls), centres and centres["dino"], TEACHER_TEMP)
        ibot_t = _targets(model, head(t_masked), centres and centres["ibot"], TEACHER_TEMP)
        # the student, one group at a time (packing is checked against this in test_models.py)
        g = model.student.backbone(batch["global_crops"], masks if student_masks else None)
        loc = model.student.backbone(batch["local_crops"])
        s_head = model.student.dino_head
        s_global, s_local = s_head(g["cls"]), s_head(loc["cls"])
        s_masked = s_head(g["patch"][masks])
        student_crops = list(s_global.chunk(2)) + list(s_local.chunk(2))  # view-major: view v = rows vB..vB+B
        dino = _dino_reference(student_crops, list(dino_t.chunk(2)))
        ibot = _ibot_reference(s_masked, ibot_t, masks, ibot_normaliser)
        koleo = KoLeoLoss()(g["cls"][:B]) + KoLeoLoss()(g["cls"][B:])
    cfg = model.loss_cfg
    loss = cfg.dino_weight * dino + cfg.ibot_weight * ibot + cfg.koleo_weight * koleo
    return {"dino": dino, "ibot": ibot, "koleo": koleo, "loss": loss}


def _model(cfg, seed: int = 0) -> SSLMetaArch:
    torch.manual_seed(seed)
    model = SSLMetaArch(cfg).train()
    with torch.no_grad():  # a teacher that differs from the student: swapping them in the wiring shows
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _close(actual: dict, expected: dict, keys=("dino", "ibot", "koleo", "loss")) -> None:
    for key in keys:
        torch.testing.assert_close(actual[key].float(), expected[key].float(), rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "softmax"])
def test_step_loss_equals_the_loss_recomputed_from_the_loss_modules(centering):
    """Every image masked (2B masked images: the normaliser is the same for the per-masked-image and
    the reference all-global-crops conventions), softmax centring with a non-zero centre."""
    cfg = _config([f"loss.centering={centering}"])
    model = _model(cfg)
    centres = None
    if centering == "softmax":
        with torch.no_grad():
            model.dino_center.center.copy_(torch.randn(1, 64))
            model.ibot_center.center.copy_(torch.randn(1, 64))
        centres = {"dino": model.dino_center.center.clone(), "ibot": model.ibot_center.center.clone()}
    batch = _batch(every_image=True)
    expected = _reference(model, batch, centres, ibot_normaliser=2 * B)
    step = model(batch, teacher_temp=TEACHER_TEMP)
    _close(step.parts, expected)
    torch.testing.assert_close(step.loss.detach(), expected["loss"], rtol=1e-5, atol=1e-6)
    if centering == "softmax":  # the centre folds in this batch's teacher logits *after* the targets
        with torch.no_grad():
            t = model.teacher.backbone(batch["global_crops"])
            dino_mean = model.teacher.dino_head(t["cls"]).mean(0, keepdim=True)
            ibot_mean = model.teacher.dino_head(t["patch"][batch["masks"]]).mean(0, keepdim=True)
        m = cfg.loss.center_momentum
        torch.testing.assert_close(model.dino_center.center, m * centres["dino"] + (1 - m) * dino_mean)
        torch.testing.assert_close(model.ibot_center.center, m * centres["ibot"] + (1 - m) * ibot_mean)


def test_the_wiring_reference_is_not_blind():
    """The recomputation tells the right wiring from the wrong ones it is meant to catch."""
    cfg = _config()
    model = _model(cfg)
    batch = _batch(every_image=True)
    right = _reference(model, batch, None, 2 * B)
    unmasked = _reference(model, batch, None, 2 * B, student_masks=False)
    assert (right["ibot"] - unmasked["ibot"]).abs() > 1e-3 and (right["dino"] - unmasked["dino"]).abs() > 1e-4
    assert (right["ibot"] - _reference(model, batch, None, B)["ibot"]).abs() > 1e-3


def test_ibot_normaliser_is_the_number_of_global_crops():
    """Reference DINOv2 (dinov2/loss/ibot_patch_loss.py:126, forward_masked: ``-loss.sum() /
    student_masks_flat.shape[0]``): the iBOT sum is divided by the number of global crops 2B, masked or
    not — here 8, while only 5 images carry a mask."""
    model = _model(_config())
    batch = _batch(every_image=False)
    assert int(batch["masks"].any(1).sum()) == 5
    expected = _reference(model, batch, None, ibot_normaliser=2 * B)
    _close(model(batch, teacher_temp=TEACHER_TEMP).parts, expected)


def test_partially_masked_batch_matches_the_reference_up_to_the_ibot_normaliser():
    """With some crops unmasked, DINO and KoLeo do not depend on the normaliser; the iBOT term is the
    reference sum divided by either convention (which one: the test above)."""
    model = _model(_config())
    batch = _batch(every_image=False)
    expected = _reference(model, batch, None, ibot_normaliser=1)
    parts = model(batch, teacher_temp=TEACHER_TEMP).parts
    _close(parts, expected, keys=("dino", "koleo"))
    candidates = [expected["ibot"] / n for n in (2 * B, 5)]
    assert any(torch.allclose(parts["ibot"], c, rtol=1e-5, atol=1e-6) for c in candidates), parts["ibot"]


def test_teacher_has_no_stochastic_depth_while_the_student_trains():
    """``model.train()`` leaves the teacher in eval mode: with stochastic depth on, its targets are the
    same on every call while the student's forward is random."""
    model = _model(_config(["model.drop_path_rate=0.5"]))
    model.train()
    batch = _batch()
    first = model.teacher_targets(batch["global_crops"], batch["mask_indices"], TEACHER_TEMP)
    again = model.teacher_targets(batch["global_crops"], batch["mask_indices"], TEACHER_TEMP)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    s1, s2 = (model.student.backbone(batch["global_crops"])["cls"] for _ in range(2))
    assert not torch.equal(s1, s2)  # stochastic depth is on: the check above is not vacuous


def _values(momentum: float = 0.9, freeze: bool = False) -> ScheduleValues:
    return ScheduleValues(
        lr=1e-2, weight_decay=0.04, momentum=momentum, teacher_temp=TEACHER_TEMP, freeze_last_layer=freeze
    )


def test_train_step_loss_then_adamw_then_ema_of_the_updated_student():
    """``train_step``: the returned loss is the recomputed one (taken before the update), the student
    moved (every parameter with a gradient), and the teacher is m · teacher + (1 − m) · *new* student."""
    cfg = _config(["optim.clip_grad=0"])
    training = build_training(cfg, DistEnv(), torch.device("cpu"))
    model = training.model
    batch = _batch(every_image=True)
    expected = _reference(model, batch, None, 2 * B)
    teacher_before = copy.deepcopy(model.teacher.state_dict())
    student_before = {n: p.detach().clone() for n, p in model.student.named_parameters()}
    parts = training.step(batch, _values(momentum=0.9))
    _close(parts, expected)
    moved = [n for n, p in model.student.named_parameters() if not torch.equal(p, student_before[n])]
    assert set(moved) == set(student_before), sorted(set(student_before) - set(moved))
    teacher_after = model.teacher.state_dict()
    for name, p in model.student.named_parameters():
        torch.testing.assert_close(
            teacher_after[name], 0.9 * teacher_before[name] + 0.1 * p.detach(), rtol=0, atol=1e-6, msg=name
        )


def test_frozen_last_layer_does_not_move_while_the_rest_trains():
    cfg = _config(["optim.clip_grad=0"])
    training = build_training(cfg, DistEnv(), torch.device("cpu"))
    last = {id(p) for g in training.optimizer.param_groups if g["is_last_layer"] for p in g["params"]}
    assert last
    before = {n: p.detach().clone() for n, p in training.model.student.named_parameters()}
    training.step(_batch(), _values(freeze=True))
    for name, p in training.model.student.named_parameters():
        assert torch.equal(p, before[name]) == (id(p) in last), name


def test_distillation_student_sees_unmasked_global_crops_by_default(tmp_path):
    """Reference distillation (no mask tokens in the student): with the default config the distilled
    student's loss is the one recomputed with the student's global crops *unmasked*; iBOT still compares
    the masked positions' patch tokens."""
    from safetensors.torch import save_file

    from dinov2.launch.run import build_meta_arch

    teacher_model = _model(_config())
    weights = tmp_path / "teacher_backbone.safetensors"
    save_file({k: v.contiguous() for k, v in teacher_model.teacher.backbone.state_dict().items()}, str(weights))
    tiny_model = [o.replace("model.", "distill.teacher_model.", 1) for o in WIRING if o.startswith("model.")]
    cfg = _config(["distill.enabled=true", f"distill.teacher_checkpoint={weights}", *tiny_model])
    torch.manual_seed(0)
    model = build_meta_arch(cfg, torch.device("cpu")).train()
    batch = _batch(every_image=True)
    expected = _reference(model, batch, None, 2 * B, student_masks=False)
    _close(model(batch, teacher_temp=TEACHER_TEMP).parts, expected)
