"""Embedding-level curation: format, index, union-find, dedup, decontamination, retrieval,
hierarchical k-means, balanced sampling, manifest, config and CLI — on synthetic embeddings."""

from __future__ import annotations

import json
import os
from collections import deque

import numpy as np
import pytest

from data_curation import embeddings as emb_io
from data_curation.config import CurationConfig, IndexConfig, QuerySetConfig, load_curation_config
from data_curation.decontaminate import drop_flagged_components, run_decontaminate
from data_curation.dedup import components, find_duplicate_pairs, run_dedup, select_keep
from data_curation.index import TorchFlatIndex, build_index, search, torch_search
from data_curation.kmeans import (
    assign,
    closest_per_cluster,
    hierarchical_kmeans,
    load_levels,
    point_labels,
    run_cluster,
)
from data_curation.manifest import read_manifest, run_manifest, write_manifest
from data_curation.retrieve import cluster_based, run_retrieve, sample_based
from data_curation.sample import balanced_hierarchical_sample, entropy, run_sample, water_fill
from data_curation.union_find import UnionFind, connected_components

pytest.importorskip("faiss")  # the package imports faiss lazily; the stages need it


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(autouse=True, scope="module")
def single_faiss_thread():
    """These problems are tiny: one OpenMP thread avoids spin-wait stalls on a busy 2-core machine."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def normalize(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def gaussian_clusters(sizes, dim=32, spread=0.35, seed=0):
    """Unit vectors around one random direction per class; returns (x, class labels)."""
    rng = np.random.default_rng(seed)
    centers = normalize(rng.normal(size=(len(sizes), dim)))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = centers[labels] + spread * rng.normal(size=(len(labels), dim)) / np.sqrt(dim)
    perm = rng.permutation(len(labels))
    return normalize(x[perm]), labels[perm]


def bfs_labels(n, i, j):
    """Reference components by breadth-first search, numbered by smallest member."""
    adj = [[] for _ in range(n)]
    for a, b in zip(i.tolist(), j.tolist()):
        adj[a].append(b)
        adj[b].append(a)
    labels = np.full(n, -1)
    c = 0
    for s in range(n):
        if labels[s] >= 0:
            continue
        labels[s] = c
        queue = deque([s])
        while queue:
            a = queue.popleft()
            for b in adj[a]:
                if labels[b] < 0:
                    labels[b] = c
                    queue.append(b)
        c += 1
    return labels


def planted_duplicates(seed=0, dim=128, n_isolated=300):
    """5 groups of near-copies, one chain a–b–c (a, c dissimilar), isolated points; shuffled.

    Returns (x, true_labels) with true labels numbered by smallest member.
    """
    rng = np.random.default_rng(seed)
    rows, group = [], []
    for g, size in enumerate([2, 3, 4, 5, 6]):
        base = rng.normal(size=dim)
        for _ in range(size):
            rows.append(base + 0.05 * rng.normal(size=dim) * np.linalg.norm(base) / np.sqrt(dim))
            group.append(g)
    e1, e2 = normalize(rng.normal(size=(2, dim)))
    e2 = normalize((e2 - (e2 @ e1) * e1)[None])[0]  # orthogonal to e1
    for v in (e1, e1 + e2, e2):  # cos(a,b) = cos(b,c) = 0.707 > 0.6, cos(a,c) = 0
        rows.append(v)
        group.append(5)
    for k in range(n_isolated):
        rows.append(rng.normal(size=dim))
        group.append(6 + k)
    perm = rng.permutation(len(rows))
    x = normalize(np.array(rows)[perm])
    group = np.array(group)[perm]
    _, first, inverse = np.unique(group, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return x, rank[inverse]


def make_workdir(tmp_path, x, shard_size=1000, dtype="float32", paths=None):
    paths = paths or [f"img/{i:05d}.jpg" for i in range(len(x))]
    emb_io.write_embeddings(tmp_path / "embeddings", x, paths, shard_size=shard_size, dtype=dtype, source="toy")
    return tmp_path


def quiet_cfg(**sections):
    """Synthetic embeddings have no images to calibrate on: fixed thresholds (the paper's) unless given."""
    cfg = CurationConfig(progress=False)
    cfg.dedup.threshold, cfg.decontaminate.threshold = 0.6, 0.45
    for name, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, name), key, value)
    return cfg


# ------------------------------------------------------------------------------ embeddings format
def test_embedding_shards_roundtrip_and_resume(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(250, 16)).astype(np.float32)
    d = tmp_path / "emb"
    for s, start in enumerate(range(0, 250, 100)):
        assert not emb_io.shard_done(d, s)
        emb_io.write_shard(d, s, x[start : start + 100], [f"p{i}" for i in range(start, min(start + 100, 250))],
                           skipped=["bad.jpg"] if s == 1 else ())
        assert emb_io.shard_done(d, s)
    assert not list(d.glob("*.tmp"))
    meta = emb_io.finalize_embeddings(d, model_id="vits14")
    assert meta["count"] == 250 and meta["shard_sizes"] == [100, 100, 50] and meta["dtype"] == "float16"
    assert meta["num_skipped"] == 1 and (d / "skipped.txt").read_text() == "bad.jpg\n"
    y, paths = emb_io.load_embeddings(d)
    assert y.dtype == np.float32 and paths == [f"p{i}" for i in range(250)]
    np.testing.assert_allclose(y, normalize(x), atol=2e-3)
    assert [s for s, _ in emb_io.iter_shards(d)] == [0, 100, 200]
    # a gap in the shard numbering is an error
    (d / "emb_00001.npy").unlink()
    with pytest.raises(ValueError, match="missing"):
        emb_io.finalize_embeddings(d)


def test_valid_rows_flags_zero_and_nan():
    x = normalize(np.random.default_rng(0).normal(size=(5, 4)))
    x[1] = 0
    x[3, 2] = np.nan
    assert emb_io.valid_rows(x).tolist() == [True, False, True, False, True]


# ------------------------------------------------------------------------------------------- index
def test_flat_index_matches_torch_search_and_numpy():
    rng = np.random.default_rng(1)
    x = normalize(rng.normal(size=(3000, 48)))
    q = normalize(rng.normal(size=(200, 48)))
    sims, ids = search(build_index(x, kind="flat", use_gpu=False), q, 10, batch_size=64)
    t_sims, t_ids = torch_search(x, q, 10, device="cpu", batch_size=50)
    chunked = search(TorchFlatIndex(x, device="cpu", chunk_size=700), q, 10)  # top-k merged across chunks
    ref = np.argsort(-(q @ x.T), axis=1)[:, :10]
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_array_equal(t_ids, ids)
    np.testing.assert_array_equal(chunked[1], ids)
    np.testing.assert_allclose(t_sims, sims, atol=1e-5)
    l2, l2_ids = search(build_index(x, kind="flat", metric="l2", use_gpu=False), q, 5)
    t_l2, t_l2_ids = torch_search(x, q, 5, device="cpu", metric="l2")
    np.testing.assert_array_equal(t_l2_ids, l2_ids)
    np.testing.assert_allclose(t_l2, l2, atol=1e-4)


@pytest.mark.gpu
def test_torch_search_on_gpu_matches_faiss_flat():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    rng = np.random.default_rng(3)
    x, q = normalize(rng.normal(size=(20000, 64))), normalize(rng.normal(size=(500, 64)))
    sims, ids = search(build_index(x, kind="flat", use_gpu=False), q, 16)
    g_sims, g_ids = torch_search(x, q, 16, device="cuda")
    assert (g_ids == ids).mean() > 0.999  # TF32 matmuls may swap near-ties
    np.testing.assert_allclose(g_sims, sims, atol=2e-3)


def test_empty_database_search():
    sims, ids = search(build_index(np.zeros((0, 8), np.float32), kind="flat", use_gpu=False), np.ones((3, 8)), 5)
    assert sims.shape == ids.shape == (3, 0)


def test_ivf_recall_on_clustered_data():
    x, _ = gaussian_clusters([800] * 20, dim=32, spread=0.5, seed=2)
    q = x[:300]
    _, exact = search(build_index(x, kind="flat", use_gpu=False), q, 10)
    pq = {"pq_m": 8, "pq_nbits": 6}
    for kind, extra, min_recall in [("ivf", {}, 0.9), ("ivfpq", pq, 0.2),
                                    ("ivfpq", {**pq, "refine": True, "refine_k_factor": 16}, 0.8)]:
        index = build_index(x, kind=kind, nlist=64, nprobe=8, use_gpu=False, **extra)
        _, approx = search(index, q, 10, batch_size=128)
        recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
        print(f"{kind} {extra} recall@10 = {recall:.3f}")
        assert recall > min_recall


# ------------------------------------------------------------------------------------- union-find
@pytest.mark.parametrize("seed,n,m", [(0, 200, 150), (1, 500, 50), (2, 300, 1000), (3, 50, 0)])
def test_union_find_matches_bfs(seed, n, m):
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, n, m), rng.integers(0, n, m)
    ref = bfs_labels(n, i, j)
    np.testing.assert_array_equal(connected_components(n, i, j), ref)
    uf = UnionFind(n)
    for a, b in zip(i.tolist(), j.tolist()):
        uf.union(a, b)
    np.testing.assert_array_equal(uf.labels(), ref)


def test_connected_components_long_chain_and_star():
    n = 100_000
    chain = np.random.default_rng(0).permutation(n)  # one path visiting all nodes in random order
    labels = connected_components(n, chain[:-1], chain[1:])
    assert (labels == 0).all()
    star = connected_components(10, np.full(5, 9), np.arange(5))  # 9 joined to 0..4
    assert star.tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4, 0]


# ------------------------------------------------------------------------------------------ dedup
def test_dedup_recovers_planted_components_exactly():
    x, truth = planted_duplicates()
    i, j, sims = find_duplicate_pairs(x, k=8, threshold=0.6)
    assert (i < j).all() and (sims > 0.6).all()
    assert len(set(zip(i.tolist(), j.tolist()))) == len(i)
    labels = components(len(x), i, j)
    np.testing.assert_array_equal(labels, truth)
    torch_cfg = IndexConfig(backend="torch", torch_device="cpu")  # exact matmul search: same pairs
    ti, tj, ts = find_duplicate_pairs(x, k=8, threshold=0.6, index_cfg=torch_cfg, batch_size=100)
    assert np.array_equal(ti, i) and np.array_equal(tj, j) and np.allclose(ts, sims, atol=1e-5)
    n_components = truth.max() + 1
    assert n_components == 6 + 300
    for rule in ["first", "random", "most_connected", "centroid", "score"]:
        kept = select_keep(labels, rule, seed=3, pairs=(i, j), emb=x, scores=np.arange(len(x)))
        assert len(kept) == n_components and np.array_equal(np.sort(labels[kept]), np.arange(n_components))
        if rule == "first":
            assert all(r == np.flatnonzero(labels == labels[r])[0] for r in kept)
        if rule == "score":  # highest score = largest index
            assert all(r == np.flatnonzero(labels == labels[r])[-1] for r in kept)
    degree = np.bincount(np.concatenate([i, j]), minlength=len(x))
    chain = [c for c in range(n_components) if np.bincount(truth)[c] == 3 and
             sorted(degree[truth == c].tolist()) == [1, 1, 2]]
    assert len(chain) == 1  # the a–b–c chain: only the middle has two edges
    middle = np.flatnonzero((truth == chain[0]) & (degree == 2))
    kept = select_keep(labels, "most_connected", pairs=(i, j))
    assert kept[truth[kept] == chain[0]].tolist() == middle.tolist()


def test_run_dedup_stage_outputs_and_idempotency(tmp_path):
    x, truth = planted_duplicates(seed=4, n_isolated=100)
    x = np.vstack([x, np.zeros((1, x.shape[1]), np.float32)])  # one failed embedding
    wd = make_workdir(tmp_path, x, shard_size=50, dtype="float16")
    cfg = quiet_cfg(dedup={"k": 8})
    summary = run_dedup(wd, cfg)
    n_comp = truth.max() + 1
    assert summary["n_components"] == n_comp and summary["n_kept"] == n_comp
    assert summary["n_skipped_embeddings"] == 1
    kept = np.load(wd / "dedup/kept.npy")
    labels = np.load(wd / "dedup/labels.npy")
    np.testing.assert_array_equal(labels[:-1], truth)
    assert labels[-1] == -1 and (wd / "dedup/skipped.txt").read_text().strip() == f"img/{len(x) - 1:05d}.jpg"
    assert len(kept) == n_comp and np.array_equal(np.unique(labels[kept]), np.arange(n_comp))
    pairs = np.load(wd / "dedup/pairs.npy")
    assert pairs.dtype.names == ("i", "j", "sim") and (pairs["i"] < pairs["j"]).all()
    report = json.loads((wd / "dedup/components.json").read_text())
    assert report["size_histogram"] == {"1": 100, "2-3": 3, "4-7": 3}
    assert report["largest_components"][0]["size"] == 6 and len(report["largest_components"][0]["members"]) == 6

    # a second run recomputes nothing; a changed setting does; force does
    stamp = {p.name: p.stat().st_mtime_ns for p in (wd / "dedup").iterdir()}
    assert run_dedup(wd, cfg) == summary
    assert {p.name: p.stat().st_mtime_ns for p in (wd / "dedup").iterdir()} == stamp
    run_dedup(wd, quiet_cfg(dedup={"k": 8, "threshold": 0.99}))
    assert (wd / "dedup/kept.npy").stat().st_mtime_ns != stamp["kept.npy"]
    assert len(np.load(wd / "dedup/kept.npy")) > n_comp  # the chain is broken at 0.99


# ---------------------------------------------------------------------------------- decontaminate
def test_decontaminate_drops_whole_components(tmp_path):
    x, truth = planted_duplicates(seed=5, n_isolated=100)
    wd = make_workdir(tmp_path, x)
    cfg = quiet_cfg(dedup={"k": 8}, decontaminate={"eval_sets": ["eval"], "threshold": 0.45})
    run_dedup(wd, cfg)
    kept = np.load(wd / "dedup/kept.npy")
    group = np.flatnonzero(truth == truth[np.argmax(np.bincount(truth)[truth])])  # the 6-copy group
    hidden = group[~np.isin(group, kept)][0]  # a removed duplicate: its kept sibling must go too
    isolated = np.flatnonzero(np.bincount(truth)[truth] == 1)[:3]
    rng = np.random.default_rng(0)
    eval_x = normalize(x[np.r_[hidden, isolated]] + 0.02 * rng.normal(size=(4, x.shape[1])))
    emb_io.write_embeddings(wd / "eval", np.vstack([eval_x, normalize(rng.normal(size=(20, x.shape[1])))]))
    summary = run_decontaminate(wd, cfg)
    out = np.load(wd / "decontaminate/kept.npy")
    dropped = set(kept.tolist()) - set(out.tolist())
    assert dropped == set(kept[np.isin(truth[kept], truth[np.r_[hidden, isolated]])].tolist())
    assert len(dropped) == 4 and summary["n_components_dropped"] == 4
    flagged = np.load(wd / "decontaminate/flagged.npy")
    assert set(flagged["row"].tolist()) >= {int(hidden), *isolated.tolist()}



def test_a_flagged_image_takes_its_kept_duplicates_with_it():
    """Rows 0-1, 2-3 and 4-5 are three dedup components; dedup kept 0, 3 and 5. Row 1 (removed by
    dedup) matches an evaluation image: its component goes, so row 0 goes although it was not flagged."""
    labels = np.array([0, 0, 1, 1, 2, 2])
    kept = np.array([0, 3, 5])
    assert drop_flagged_components(kept, labels, np.array([1])).tolist() == [3, 5]
    assert drop_flagged_components(kept, labels, np.array([3, 4])).tolist() == [0]
    assert drop_flagged_components(kept, labels, np.array([], dtype=np.int64)).tolist() == [0, 3, 5]

# ---------------------------------------------------------------------------------------- retrieve
def test_retrieval_sample_and_cluster_based(tmp_path):
    pool, pool_y = gaussian_clusters([600] * 10, dim=32, spread=0.8, seed=6)
    queries, query_y = gaussian_clusters([600] * 10, dim=32, spread=0.8, seed=6)  # same centres
    rng = np.random.default_rng(1)
    q = normalize(queries[query_y == 3][:100] + 0.01 * rng.normal(size=(100, 32)))
    k = 10
    found = sample_based(pool, q, k)
    _, nn = search(build_index(pool, kind="flat", use_gpu=False), q, k)
    precision_at_k = (pool_y[nn] == 3).mean()
    print(f"synthetic retrieval: precision@{k} = {precision_at_k:.3f}, union precision = "
          f"{(pool_y[found] == 3).mean():.3f} (chance 0.100)")
    assert precision_at_k > 0.9 and (pool_y[found] == 3).mean() > 0.9

    from data_curation.kmeans import train_kmeans

    centroids = train_kmeans(pool, 40, seed=0, use_gpu=False)
    labels, score = assign(pool, centroids, use_gpu=False)
    q_labels, _ = assign(q, centroids, use_gpu=False)
    selected, chosen = cluster_based(labels, score, q_labels, 40, min_queries=5, per_cluster=50, pick="closest")
    assert len(chosen) and (pool_y[selected] == 3).mean() > 0.9
    assert all((labels[selected] == c).sum() <= 50 for c in chosen)

    # the stage: both methods, union, deduplicated
    wd = make_workdir(tmp_path, pool)
    emb_io.write_embeddings(wd / "queries", q)
    cfg = quiet_cfg(retrieve={"n_clusters": 40, "query_sets": [
        QuerySetConfig(path="queries", k=k), QuerySetConfig(path="queries", name="qc", method="cluster",
                                                          min_queries=5, per_cluster=50)]})
    summary = run_retrieve(wd, cfg)
    stage_sel = np.load(wd / "retrieve/selected.npy")
    assert np.array_equal(stage_sel, np.unique(stage_sel)) and summary["n_selected"] == len(stage_sel)
    assert set(found.tolist()) <= set(stage_sel.tolist())
    assert (pool_y[stage_sel] == 3).mean() > 0.9


# --------------------------------------------------------------------------- k-means and sampling
def test_hierarchical_kmeans_levels_and_resampling(tmp_path):
    x, _ = gaussian_clusters([300] * 10, dim=16, spread=0.6, seed=7)
    levels = hierarchical_kmeans(x, [60, 8], n_resampling_steps=[2, 1], sample_size=[5, 3], niter=10,
                                 use_gpu=False)
    assert [lv.centroids.shape for lv in levels] == [(60, 16), (8, 16)]
    assert levels[0].assign.shape == (len(x),) and levels[1].assign.shape == (60,)
    # level 2 is a clustering of the level-1 centroids: each centroid goes to its nearest level-2 one
    nearest, _ = assign(levels[0].centroids, levels[1].centroids, use_gpu=False)
    np.testing.assert_array_equal(levels[1].assign, nearest)
    np.testing.assert_allclose(np.linalg.norm(levels[1].centroids, axis=1), 1, atol=1e-5)
    top = point_labels(levels)[1]
    np.testing.assert_array_equal(top, levels[1].assign[levels[0].assign])

    # the stage writes every level and resumes after the finished ones
    wd = make_workdir(tmp_path, x)
    cfg = quiet_cfg(cluster={"n_clusters": [60, 8], "n_resampling_steps": [1], "sample_size": [5], "niter": 10})
    run_cluster(wd, cfg)
    for lv, k in [(1, 60), (2, 8)]:
        assert np.load(wd / f"cluster/level{lv}_centroids.npy").shape == (k, 16)
    assert np.load(wd / "cluster/level1_assign.npy").shape == (len(x),)
    stamp = (wd / "cluster/level1_centroids.npy").stat().st_mtime_ns
    (wd / "cluster/DONE").unlink()
    (wd / "cluster/level2.json").unlink()  # as if interrupted during level 2
    run_cluster(wd, cfg)
    assert (wd / "cluster/level1_centroids.npy").stat().st_mtime_ns == stamp
    assert (wd / "cluster/level2.json").is_file()


def test_closest_per_cluster_and_water_fill():
    labels = np.array([0, 0, 0, 1, 1, 2])
    score = np.array([0.1, 0.9, 0.5, 0.3, 0.2, 0.0])
    assert closest_per_cluster(labels, score, 2).tolist() == [1, 2, 3, 4, 5]
    caps = np.array([5, 100, 1, 30, 0, 50])
    for budget in [0, 7, 60, 120, 186, 500]:
        alloc = water_fill(caps, budget, np.random.default_rng(budget))
        assert alloc.sum() == min(budget, caps.sum()) and (alloc <= caps).all()
        unsaturated = alloc[alloc < caps]
        assert unsaturated.size == 0 or alloc.max() - unsaturated.min() <= 1
    assert water_fill(caps, 60).tolist() == [5, 18, 1, 18, 0, 18]


def test_balanced_sampling_flattens_an_imbalanced_pool(tmp_path):
    sizes = np.geomspace(5000, 50, 10).astype(int)
    x, y = gaussian_clusters(sizes, dim=32, spread=0.5, seed=8)
    wd = make_workdir(tmp_path, x, shard_size=5000)
    target = 1000
    cfg = quiet_cfg(cluster={"n_clusters": [200, 50, 10], "n_resampling_steps": [1], "sample_size": [10, 5, 3],
                             "niter": 10}, sample={"target_size": target})
    run_cluster(wd, cfg)
    summary = run_sample(wd, cfg)
    selected = np.load(wd / "sample/selected.npy")
    assert len(selected) == target == summary["n_selected"] and len(np.unique(selected)) == target
    uniform = np.random.default_rng(0).choice(len(x), size=target, replace=False)
    h_bal, h_uni, h_max = entropy(y[selected]), entropy(y[uniform]), np.log(10)
    print(f"class entropy (nats): balanced {h_bal:.3f}, uniform random {h_uni:.3f}, max {h_max:.3f}; "
          f"per-class balanced {np.bincount(y[selected], minlength=10).tolist()}")
    assert h_bal > h_uni + 0.4
    # leaf selection 'closest' and direct use give the requested size too
    levels = load_levels(wd / "cluster")
    assert len(levels) == 3
    assert len(balanced_hierarchical_sample(levels, 300, "closest")) == 300
    assert len(balanced_hierarchical_sample(levels, 10**9)) == len(x)


# ---------------------------------------------------------------------------------------- manifest
def test_manifest_roundtrip(tmp_path):
    rows = [("a/b.jpg", "laion", "3"), ('weird, "name".png', "web", None), ("c.jpg", "web")]
    assert write_manifest(tmp_path / "m.csv", rows) == 3
    assert (tmp_path / "m.csv").read_text().splitlines()[0] == "path,source,label"
    assert read_manifest(tmp_path / "m.csv") == [("a/b.jpg", "laion", "3"), ('weird, "name".png', "web", None),
                                                 ("c.jpg", "web", None)]
    (tmp_path / "bad.csv").write_text("file,label\nx,1\n")
    with pytest.raises(ValueError, match="header"):
        read_manifest(tmp_path / "bad.csv")


def test_run_manifest_maps_selection_to_paths(tmp_path):
    x = normalize(np.random.default_rng(0).normal(size=(30, 8)))
    wd = make_workdir(tmp_path, x, shard_size=7)
    np.save(wd / "rows.npy", np.array([25, 3, 3, 11]))
    np.save(wd / "labels.npy", np.arange(30) % 4)
    cfg = quiet_cfg(manifest={"selection": "rows.npy", "labels": "labels.npy"})
    summary = run_manifest(wd, cfg)
    assert summary["n_rows"] == 3
    assert read_manifest(wd / "manifest/manifest.csv") == [
        ("img/00003.jpg", "toy", "3"), ("img/00011.jpg", "toy", "3"), ("img/00025.jpg", "toy", "1")]


# ------------------------------------------------------------------------------------ config + CLI
def test_config_defaults_yaml_and_unknown_keys():
    from dinov2.config import ConfigError

    assert load_curation_config("curation/default") == CurationConfig()
    cfg = load_curation_config(None, ["dedup.threshold=0.7", "cluster.n_clusters=[50,5]"])
    assert cfg.dedup.threshold == 0.7 and cfg.cluster.n_clusters == [50, 5]
    with pytest.raises(ConfigError, match="threshold"):
        load_curation_config(None, ["dedup.treshold=0.7"])


def test_cli_runs_stages_and_skips_done_ones(tmp_path, capsys):
    from data_curation.cli import STAGES, main

    expected = {"embed", "calibrate", "dedup", "decontaminate", "retrieve", "cluster", "sample", "manifest", "report",
                "export-shards", "pack"}  # fmt: skip
    assert expected <= set(STAGES)
    x, truth = planted_duplicates(seed=9, n_isolated=50)
    wd = make_workdir(tmp_path, x)
    args = ["dedup,manifest", "--workdir", str(wd), "--config", "curation/default", "progress=false", "dedup.k=8"]
    args.append("dedup.threshold=0.6")  # synthetic embeddings: no images for `calibrate`
    assert main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [ln["stage"] for ln in lines] == ["dedup", "manifest"]
    assert lines[1]["selection"] == "dedup" and lines[1]["n_rows"] == truth.max() + 1
    mtime = os.stat(wd / "manifest/manifest.csv").st_mtime_ns
    assert main(args) == 0
    assert os.stat(wd / "manifest/manifest.csv").st_mtime_ns == mtime
    assert main(["dedup", "--workdir", str(wd), "dedup.kk=3"]) == 2
    assert main(["embedx", "--workdir", str(wd)]) == 2
