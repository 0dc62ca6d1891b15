"""Tests for dinov2.losses: exact values against hand-written references, plus a 2-process gloo run."""

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov2.distributed import comm
from dinov2.losses import Centering, DINOLoss, IBOTPatchLoss, KoLeoLoss, masked_patch_weights

# ----------------------------------------------------------------------------------------------
# Hand-written references (plain loops, float64), independent of the modules' code paths.
# ----------------------------------------------------------------------------------------------


def sinkhorn_reference(logits, temp, n_iter):
    """Sinkhorn-Knopp in float64 with explicit loops, K x B layout as in the SwAV/DINOv2 papers."""
    n_samples, n_protos = len(logits), len(logits[0])
    q = np.zeros((n_protos, n_samples), dtype=np.float64)
    for b in range(n_samples):
        for k in range(n_protos):
            q[k, b] = math.exp(logits[b][k] / temp)
    total = sum(q[k, b] for k in range(n_protos) for b in range(n_samples))
    q /= total
    for _ in range(n_iter):
        for k in range(n_protos):
            row = sum(q[k, b] for b in range(n_samples))
            for b in range(n_samples):
                q[k, b] = q[k, b] / row / n_protos
        for b in range(n_samples):
            col = sum(q[k, b] for k in range(n_protos))
            for k in range(n_protos):
                q[k, b] = q[k, b] / col / n_samples
    return (q * n_samples).T


def log_softmax2(a0, a1, temp):
    """log softmax of a 2-vector (a0, a1) / temp, written out."""
    z0, z1 = a0 / temp, a1 / temp
    log_norm = math.log(math.exp(z0) + math.exp(z1))
    return z0 - log_norm, z1 - log_norm


def cross_entropy2(p, logits, temp):
    """-sum_k p_k log softmax(logits / temp)_k for K = 2."""
    l0, l1 = log_softmax2(logits[0], logits[1], temp)
    return -(p[0] * l0 + p[1] * l1)


# ----------------------------------------------------------------------------------------------
# comm helpers
# ----------------------------------------------------------------------------------------------


def test_comm_single_process_is_noop():
    assert not comm.is_distributed()
    assert comm.world_size() == 1
    t = torch.tensor([1.0, -2.0])
    assert comm.all_reduce_sum_(t) is t
    assert comm.all_reduce_max_(t) is t
    assert t.tolist() == [1.0, -2.0]


# ----------------------------------------------------------------------------------------------
# Centering: Sinkhorn-Knopp
# ----------------------------------------------------------------------------------------------

SK_LOGITS = [
    [0.1, 0.5, -0.3, 0.2],
    [1.0, -0.4, 0.0, 0.3],
    [-0.2, 0.7, 0.4, -1.1],
]


def test_sinkhorn_matches_loop_reference():
    temp = 0.5
    centering = Centering(4, mode="sinkhorn_knopp", sk_iterations=3)
    out = centering(torch.tensor(SK_LOGITS), temp)
    expected = sinkhorn_reference(SK_LOGITS, temp, 3)
    assert out.dtype == torch.float32 and out.shape == (3, 4)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)
    # Sanity: this is not just a softmax (the reference and softmax differ noticeably).
    softmax = torch.softmax(torch.tensor(SK_LOGITS, dtype=torch.float64) / temp, dim=-1).numpy()
    assert np.abs(expected - softmax).max() > 1e-2


def test_sinkhorn_one_iteration_reference():
    centering = Centering(4, sk_iterations=1)
    out = centering(torch.tensor(SK_LOGITS), 0.2)
    np.testing.assert_allclose(out.numpy(), sinkhorn_reference(SK_LOGITS, 0.2, 1), rtol=0, atol=1e-6)


def test_sinkhorn_doubly_stochastic_after_many_iterations():
    gen = torch.Generator().manual_seed(0)
    n_samples, n_protos = 24, 8
    logits = torch.randn(n_samples, n_protos, generator=gen)
    out = Centering(n_protos, sk_iterations=50)(logits, 1.0)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(n_samples), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.sum(dim=0), torch.full((n_protos,), n_samples / n_protos), rtol=0, atol=1e-5)
    assert (out >= 0).all()


def test_sinkhorn_low_precision_input_and_shift_invariance():
    gen = torch.Generator().manual_seed(1)
    # Logits on a 2**-10 grid so that adding the offset below is exact in float32.
    logits = torch.round(torch.randn(6, 5, generator=gen) * 1024) / 1024
    centering = Centering(5)
    ref = centering(logits, 0.5)
    # exp(2 * 256) overflows float32 without the max subtraction; the common offset must cancel.
    shifted = centering(logits + 256.0, 0.5)
    assert torch.isfinite(shifted).all()
    torch.testing.assert_close(shifted, ref, rtol=0, atol=1e-6)
    # bfloat16 input is computed in float32 and returns float32.
    low = centering(logits.bfloat16(), 0.5)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, centering(logits.bfloat16().float(), 0.5), rtol=0, atol=0)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_sinkhorn_ignores_padding_rows(as_tensor):
    gen = torch.Generator().manual_seed(2)
    real = torch.randn(5, 6, generator=gen)
    padding = torch.tensor([[float("nan")] * 6, [float("inf")] * 6, [1e4] * 6])
    logits = torch.cat([real, padding])
    centering = Centering(6, sk_iterations=3)
    n_valid = torch.tensor(5) if as_tensor else 5
    out = centering(logits, 0.07, n_valid=n_valid)
    torch.testing.assert_close(out[:5], centering(real, 0.07), rtol=0, atol=1e-6)
    assert (out[5:] == 0).all()


def test_sinkhorn_flattens_leading_dims():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 7, generator=gen)
    centering = Centering(7)
    out = centering(logits, 0.1)
    assert out.shape == (2, 4, 7)
    torch.testing.assert_close(out.reshape(8, 7), centering(logits.reshape(8, 7), 0.1), rtol=0, atol=0)


def test_centering_validates_arguments():
    with pytest.raises(ValueError):
        Centering(4, mode="bogus")
    with pytest.raises(ValueError):
        Centering(4, sk_iterations=0)
    with pytest.raises(ValueError):
        Centering(4)(torch.zeros(2, 3), 0.1)
    sinkhorn = Centering(4)
    sinkhorn.update(torch.zeros(2, 4))  # no state to update: a no-op, so callers need not ask the mode
    assert "center" not in sinkhorn.state_dict()


# ----------------------------------------------------------------------------------------------
# Centering: softmax with EMA centre
# ----------------------------------------------------------------------------------------------


def test_softmax_center_update_hand_computed():
    centering = Centering(2, mode="softmax", momentum=0.9)
    assert centering.center.tolist() == [[0.0, 0.0]]
    centering.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    torch.testing.assert_close(centering.center, torch.tensor([[0.2, 0.3]]), rtol=0, atol=1e-7)
    # Second step: 0.9 * [0.2, 0.3] + 0.1 * mean([[0, 1], [2, 1], [4, 4]]) = [0.18 + 0.2, 0.27 + 0.2]
    centering.update(torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]]))
    torch.testing.assert_close(centering.center, torch.tensor([[0.38, 0.47]]), rtol=0, atol=1e-6)
    assert "center" in centering.state_dict()


def test_softmax_forward_uses_center_and_does_not_update_it():
    centering = Centering(2, mode="softmax")
    centering.center.copy_(torch.tensor([[0.2, 0.3]]))
    probs = centering(torch.tensor([[1.0, 2.0]]), 0.5)
    # softmax(([1, 2] - [0.2, 0.3]) / 0.5) = softmax([1.6, 3.4])
    e0, e1 = math.exp(1.6), math.exp(3.4)
    torch.testing.assert_close(probs, torch.tensor([[e0 / (e0 + e1), e1 / (e0 + e1)]]), rtol=0, atol=1e-7)
    torch.testing.assert_close(centering.center, torch.tensor([[0.2, 0.3]]), rtol=0, atol=0)


def test_softmax_padding_rows():
    centering = Centering(2, mode="softmax", momentum=0.5)
    logits = torch.tensor([[1.0, 3.0], [float("nan"), 100.0]])
    probs = centering(logits, 1.0, n_valid=1)
    assert (probs[1] == 0).all() and torch.isfinite(probs).all()
    centering.update(logits, n_valid=torch.tensor(1))
    torch.testing.assert_close(centering.center, torch.tensor([[0.5, 1.5]]), rtol=0, atol=0)
    # No real row at all: the centre must not move.
    centering.update(logits, n_valid=0)
    torch.testing.assert_close(centering.center, torch.tensor([[0.5, 1.5]]), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# DINO loss
# ----------------------------------------------------------------------------------------------


def test_dino_loss_hand_computed():
    temp = 0.5
    g1, g2 = (1.0, 0.0), (0.0, 2.0)  # student global views 1 and 2 (B = 1, K = 2)
    loc = (0.5, -0.5)  # student local crop
    t1, t2 = (0.7, 0.3), (0.2, 0.8)  # teacher targets for views 1 and 2
    # Pairs: (g1, t2), (g2, t1), (local, t1), (local, t2); same-view pairs are excluded.
    expected = (
        cross_entropy2(t2, g1, temp)
        + cross_entropy2(t1, g2, temp)
        + cross_entropy2(t1, loc, temp)
        + cross_entropy2(t2, loc, temp)
    ) / 4
    loss = DINOLoss(student_temp=temp)(
        torch.tensor([[g1], [g2]]), torch.tensor([[t1], [t2]]), student_local=torch.tensor([[loc]])
    )
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(expected, abs=1e-6)

    globals_only = DINOLoss(student_temp=temp)(torch.tensor([[g1], [g2]]), torch.tensor([[t1], [t2]]))
    expected_globals = (cross_entropy2(t2, g1, temp) + cross_entropy2(t1, g2, temp)) / 2
    assert globals_only.item() == pytest.approx(expected_globals, abs=1e-6)


def test_dino_loss_batch_mean_with_loops():
    temp = 0.1
    gen = torch.Generator().manual_seed(4)
    n_batch, n_local = 3, 2
    s_global = torch.randn(2, n_batch, 2, generator=gen) * 0.3
    s_local = torch.randn(n_local, n_batch, 2, generator=gen) * 0.3
    t = torch.softmax(torch.randn(2, n_batch, 2, generator=gen), dim=-1)

    def pair_term(p_view, s_crop):  # batch mean of the cross-entropy for one (crop, view) pair
        return sum(cross_entropy2(p_view[b].tolist(), s_crop[b].tolist(), temp) for b in range(n_batch)) / n_batch

    terms = [pair_term(t[tv], s_global[v]) for v in range(2) for tv in range(2) if tv != v]
    terms += [pair_term(t[tv], s_local[c]) for c in range(n_local) for tv in range(2)]
    assert len(terms) == 2 + 2 * n_local
    expected = sum(terms) / len(terms)
    loss = DINOLoss(student_temp=temp)(s_global, t, s_local)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    # bfloat16 student logits are computed in float32.
    low = DINOLoss(student_temp=temp)(s_global.bfloat16(), t, s_local.bfloat16())
    assert low.dtype == torch.float32


def test_dino_loss_gradient_flows_to_student_only():
    s = torch.randn(2, 4, 8, requires_grad=True)
    loc = torch.randn(3, 4, 8, requires_grad=True)
    t = torch.softmax(torch.randn(2, 4, 8), dim=-1)
    DINOLoss()(s, t, loc).backward()
    assert s.grad is not None and loc.grad is not None
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_dino_loss_validates_shapes():
    with pytest.raises(ValueError):
        DINOLoss()(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError):
        DINOLoss()(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))


# ----------------------------------------------------------------------------------------------
# iBOT patch loss
# ----------------------------------------------------------------------------------------------


def test_masked_patch_weights():
    masks = torch.tensor([[True, False, False], [False, True, True], [False, False, False]])
    assert masked_patch_weights(masks).tolist() == [1.0, 0.5, 0.5]
    assert masked_patch_weights(masks).dtype == torch.float32
    assert masked_patch_weights(torch.zeros(2, 4, dtype=torch.bool)).shape == (0,)


def test_ibot_loss_hand_computed():
    temp = 0.2
    # Image 0 has one masked patch (a), image 1 has two (b, c); K = 2.
    s_a, s_b, s_c = (0.3, -0.1), (0.0, 0.4), (-0.5, 0.2)
    p_a, p_b, p_c = (0.9, 0.1), (0.4, 0.6), (0.25, 0.75)
    ce_a = cross_entropy2(p_a, s_a, temp)
    ce_b = cross_entropy2(p_b, s_b, temp)
    ce_c = cross_entropy2(p_c, s_c, temp)
    expected = (ce_a + (ce_b + ce_c) / 2) / 2  # mean over images of the mean over their patches

    masks = torch.tensor([[False, True, False], [True, False, True]])
    weights = masked_patch_weights(masks)
    loss_fn = IBOTPatchLoss(student_temp=temp)
    student = torch.tensor([s_a, s_b, s_c])
    teacher = torch.tensor([p_a, p_b, p_c])
    loss = loss_fn(student, teacher, weights, n_images=2)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss_fn(student, teacher, weights, torch.tensor(2)).item() == pytest.approx(expected, abs=1e-6)

    # Padding rows past len(weights) (even non-finite ones) are ignored.
    padded_student = torch.cat([student, torch.full((2, 2), float("nan"))])
    padded_teacher = torch.cat([teacher, torch.zeros(2, 2)])
    padded = loss_fn(padded_student, padded_teacher, weights, 2)
    assert padded.item() == pytest.approx(expected, abs=1e-6)


def test_ibot_term_of_a_step_divides_by_all_global_crops():
    """The iBOT term of a training step as the reference computes it (dinov2 ``train/ssl_meta_arch.py``:
    ``forward_masked(...) * loss_scales * ibot_loss_scale`` = ``forward_masked(...) * 2 * 1/2``, and
    ``forward_masked`` returns ``-sum(w * CE) / student_masks_flat.shape[0]``): the weighted sum over the
    masked patches divided by the number of global crops 2B, masked or not. Two of six crops are masked
    here, so dividing by the masked crops instead (the old code) gives 3x this value."""
    from tiny_config import TINY_MODEL

    from dinov2.config import load_config
    from dinov2.train.meta_arch import SSLMetaArch

    torch.manual_seed(0)
    cfg = load_config(None, TINY_MODEL + ["loss.koleo_weight=0", "loss.student_temp=0.1"])
    model = SSLMetaArch(cfg).eval()  # eval: no stochastic depth, the student's forward is repeatable
    batch_size, n_patches = 3, 16  # 16 px crops, 4 px patches
    masks = torch.zeros(2 * batch_size, n_patches, dtype=torch.bool)
    masks[0, [1, 5]] = True  # crop 0 (view 1, image 0): 2 masked patches
    masks[4, [0, 2, 3, 9, 15]] = True  # crop 4 (view 2, image 1): 5 masked patches
    mask_indices = masks.flatten().nonzero().flatten()
    batch = {
        "global_crops": torch.randn(2 * batch_size, 3, 16, 16),
        "local_crops": torch.randn(2 * batch_size, 3, 8, 8),
        "masks": masks,
        "mask_indices": mask_indices,
        "mask_weights": masked_patch_weights(masks),
    }
    with torch.no_grad():
        dino_targets, ibot_targets, _ = model.teacher_targets(batch["global_crops"], mask_indices, 0.07)
        step = model.student_losses(model.student, batch, dino_targets, ibot_targets)
        out = model.student.backbone([batch["global_crops"], batch["local_crops"]], [masks, None])
        student_logits = model.student.dino_head(out[0]["patch"].flatten(0, 1)[mask_indices]).double()
    teacher = ibot_targets.double()
    total = 0.0
    for row, flat_index in enumerate(mask_indices.tolist()):
        crop = flat_index // n_patches
        weight = 1.0 / int(masks[crop].sum())
        z = [v / 0.1 for v in student_logits[row].tolist()]
        log_norm = math.log(sum(math.exp(v - max(z)) for v in z)) + max(z)
        cross_entropy = -sum(p * (v - log_norm) for p, v in zip(teacher[row].tolist(), z, strict=True))
        total += weight * cross_entropy
    reference = total / (2 * batch_size)
    assert step.parts["ibot"].item() == pytest.approx(reference, rel=1e-5)


def test_ibot_loss_no_masked_patches_is_zero():
    loss = IBOTPatchLoss()(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0), n_images=0)
    assert loss.item() == 0.0


# ----------------------------------------------------------------------------------------------
# KoLeo
# ----------------------------------------------------------------------------------------------


def test_koleo_hand_computed():
    # Unnormalized inputs; after L2 normalization:
    # a = (1, 0), b = (0, 1), c = (2, 1) / sqrt(5), d = (-1, -2) / sqrt(5).
    x = torch.tensor([[3.0, 0.0], [0.0, 0.5], [2.0, 1.0], [-0.5, -1.0]])
    r5 = math.sqrt(5)
    # Nearest neighbours by cosine: a -> c (2/r5), b -> c (1/r5), c -> a (2/r5),
    # d -> a (-1/r5 beats -2/r5 and -4/5: a negative best similarity, so d must not pick itself).
    d_ac = math.sqrt((1 - 2 / r5) ** 2 + (1 / r5) ** 2)
    d_bc = math.sqrt((2 / r5) ** 2 + (1 - 1 / r5) ** 2)
    d_da = math.sqrt((1 + 1 / r5) ** 2 + (2 / r5) ** 2)
    expected = -(math.log(d_ac) + math.log(d_bc) + math.log(d_ac) + math.log(d_da)) / 4
    loss = KoLeoLoss()(x)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_koleo_identical_rows_are_finite():
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]], requires_grad=True)
    loss = KoLeoLoss()(x)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    # Two identical rows: the distance is ||0 + eps * 1|| = sqrt(D) * eps (pairwise_distance
    # convention), and the log gets another + eps.
    eps = 1e-8
    pair = KoLeoLoss(eps=eps)(torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))
    assert pair.item() == pytest.approx(-math.log(math.sqrt(3) * eps + eps), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_koleo_low_precision_computed_in_fp32(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 32, generator=gen).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = KoLeoLoss()(x)
    assert loss.dtype == torch.float32
    ref = KoLeoLoss()(x.float())
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)


def test_koleo_rejects_single_sample():
    with pytest.raises(ValueError):
        KoLeoLoss()(torch.randn(1, 4))


# ----------------------------------------------------------------------------------------------
# Two processes (gloo): all-reduced Sinkhorn-Knopp and softmax centre == one process
# ----------------------------------------------------------------------------------------------

TEMP = 0.07


def _dist_inputs():
    gen = torch.Generator().manual_seed(6)
    sk = torch.randn(8, 16, generator=gen)
    sk[4:] += 5.0  # very different scales per rank: a per-rank max shift would give wrong answers
    padded = torch.randn(8, 16, generator=gen)
    centre = torch.randn(8, 16, generator=gen)
    return sk, padded, centre


def _dist_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sk, padded, centre = _dist_inputs()
        result = {"is_dist": comm.is_distributed(), "world_size": comm.world_size()}
        # 1. Plain halves: rank 0 rows 0..3, rank 1 rows 4..7.
        sk_mod = Centering(16, sk_iterations=3)
        result["sk"] = sk_mod(sk[4 * rank : 4 * rank + 4], TEMP)
        # 2. Padded halves: rank 0 holds 3 real rows + 1 garbage, rank 1 holds 4 real rows.
        local = padded[4 * rank : 4 * rank + 4].clone()
        n_valid = 3 if rank == 0 else 4
        local[n_valid:] = float("nan")
        result["sk_padded"] = sk_mod(local, TEMP, n_valid=torch.tensor(n_valid))
        # 3. Softmax centre with uneven rows: rank 0 rows 0..2, rank 1 rows 3..7 (+1 padding row).
        soft = Centering(16, mode="softmax", momentum=0.9)
        if rank == 0:
            soft.update(centre[:3])
        else:
            soft.update(torch.cat([centre[3:], torch.full((1, 16), 1e6)]), n_valid=5)
        result["center"] = soft.center.clone()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_matches_single_process(tmp_path):
    world = 2
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    sk, padded, centre = _dist_inputs()
    for r in results:
        assert r["is_dist"] and r["world_size"] == world

    expected = Centering(16, sk_iterations=3)(sk, TEMP)
    got = torch.cat([r["sk"] for r in results])
    assert (got - expected).abs().max().item() <= 1e-6

    real_rows = torch.cat([padded[:3], padded[4:]])
    expected_padded = Centering(16, sk_iterations=3)(real_rows, TEMP)
    got_padded = torch.cat([results[0]["sk_padded"][:3], results[1]["sk_padded"]])
    assert (got_padded - expected_padded).abs().max().item() <= 1e-6
    assert (results[0]["sk_padded"][3] == 0).all()

    single = Centering(16, mode="softmax", momentum=0.9)
    single.update(centre)
    for r in results:
        torch.testing.assert_close(r["center"], single.center, rtol=0, atol=1e-6)
