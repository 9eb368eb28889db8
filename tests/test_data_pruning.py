"""Dataset pruning: the papers' invariants (EL2N, forgetting, prototypes, SemDeDup, DBP quotas), per-example gradients
against autograd, bad input, out-of-core files, real MiniLM embeddings and real digits, and the CLI."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
import torch

from prunekit import data as D
from prunekit.cli import main
from prunekit.errors import ArgumentError

semdedup_module = importlib.import_module("prunekit.data.semdedup")  # the package exports a function of that name


def clustered(n: int = 600, dim: int = 32, centers: int = 6, seed: int = 0, spread: float = 0.3) -> np.ndarray:
    """Points around a few random directions (a clustered structure, like real embeddings)."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((centers, dim))
    return (directions[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, dim))).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# EL2N, GraNd, forgetting


@pytest.mark.parametrize("classes", [2, 3, 10])
def test_el2n_is_zero_when_confidently_right_and_sqrt_one_minus_one_over_c_when_uniform(classes):
    confident = np.zeros((classes, classes))
    confident[np.arange(classes), np.arange(classes)] = 60.0  # softmax is one-hot up to e^-60
    labels = np.arange(classes)
    assert np.allclose(D.el2n_scores(confident, labels), 0.0, atol=1e-12)
    uniform = np.zeros((classes, classes))
    assert np.allclose(D.el2n_scores(uniform, labels), math.sqrt(1 - 1 / classes))
    probabilities = np.full((classes, classes), 1 / classes)
    assert np.allclose(D.el2n_scores(probabilities, labels, from_logits=False), math.sqrt(1 - 1 / classes))
    wrong = np.roll(confident, 1, axis=1)  # confidently wrong: sqrt(2), the maximum
    assert np.allclose(D.el2n_scores(wrong, labels), math.sqrt(2))


def test_el2n_averages_over_models():
    right, uniform = np.array([[60.0, 0.0]]), np.array([[0.0, 0.0]])
    assert np.allclose(D.el2n_scores(np.stack([right, uniform]), [0]), math.sqrt(0.5) / 2)


def test_grand_equals_the_autograd_gradient_norm_of_each_example():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 4 * 4, 4))
    x, y = torch.randn(7, 1, 6, 6), torch.randint(0, 4, (7,))
    expected = []
    for i in range(len(x)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        expected.append(math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters())))
    got = D.grand_scores(model, x, y, batch_size=3, progress=False)
    assert np.allclose(got, expected, rtol=1e-4)
    other = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 4 * 4, 4))
    both = D.grand_scores([model, other], x, y, progress=False)  # E over models
    assert np.allclose(both, (got + D.grand_scores(other, x, y, progress=False)) / 2)


def test_forgetting_counts_correct_to_incorrect_flips():
    assert D.forgetting_counts([1, 0, 1, 0]).tolist() == [2.0]
    history = np.array([[1, 0, 0, 1], [0, 1, 0, 1], [1, 0, 0, 1], [0, 1, 0, 1]])  # 4 presentations x 4 examples
    assert D.forgetting_counts(history).tolist() == [2.0, 1.0, math.inf, 0.0]
    assert D.forgetting_counts(history, unlearned=-1).tolist()[2] == -1.0


def test_forgetting_tracker_matches_the_history_count():
    rng = np.random.default_rng(0)
    history = rng.random((9, 40)) < 0.6
    tracker = D.ForgettingTracker(40)
    for row in history:
        order = rng.permutation(40)  # examples arrive in shuffled mini-batches
        for part in np.array_split(order, 3):
            tracker.update(part, row[part])
    assert np.array_equal(tracker.counts(), D.forgetting_counts(history))


# ---------------------------------------------------------------------------------------------------------------
# Selection


def test_select_keeps_the_hardest_or_easiest_share():
    scores = np.array([0.5, 3.0, 1.0, 2.0, -1.0, 4.0])
    assert D.select(scores, 0.5).tolist() == [1, 3, 5]
    assert D.select(scores, 0.5, hardness="easy").tolist() == [0, 2, 4]
    assert D.select(scores, 1.0).tolist() == list(range(6))


def test_class_balanced_selection_keeps_the_same_share_of_every_class():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [500, 300, 200])
    scores = rng.random(1000) + labels  # class 2 is "hardest": plain selection would take mostly class 2
    plain = D.select(scores, 0.2)
    balanced = D.select(scores, 0.2, labels=labels, class_balanced=True)
    assert len(balanced) == len(plain) == 200
    assert np.bincount(labels[plain], minlength=3).tolist() == [0, 0, 200]
    assert np.bincount(labels[balanced], minlength=3).tolist() == [100, 60, 40]
    for c in range(3):  # within each class the hardest are kept
        members = np.flatnonzero(labels == c)
        kept = np.intersect1d(balanced, members)
        assert scores[kept].min() >= np.sort(scores[members])[::-1][len(kept) - 1]


# ---------------------------------------------------------------------------------------------------------------
# Prototypes, SemDeDup, DBP


def test_prototype_scores_are_invariant_to_embedding_scale_and_are_distances_to_the_nearest_centroid():
    x = clustered()
    clustering = D.kmeans(D.prepare(x), 6, seed=0, progress=False)
    scores = D.prototype_scores(x, 6, clustering=clustering)
    unit = D.normalize(x)
    assert np.allclose(scores, 1 - (unit @ clustering.centroids.T).max(axis=1), atol=1e-5)
    for scale in (1e-3, 1000.0):
        scaled = D.prototype_scores(x * scale, 6, seed=0, progress=False)
        assert np.allclose(scaled, D.prototype_scores(x, 6, seed=0, progress=False), atol=1e-5)
    assert np.array_equal(D.select(D.prototype_scores(x * 1000.0, 6, progress=False), 0.3),
                          D.select(D.prototype_scores(x, 6, progress=False), 0.3))


def test_semdedup_keeps_exactly_one_of_each_group_of_exact_duplicates():
    rng = np.random.default_rng(1)
    x = clustered(400, seed=1)
    groups = [rng.choice(400, size, replace=False) for size in (2, 3, 5, 8)]
    copies = np.concatenate([np.repeat(x[g[:1]], len(g) - 1, axis=0) for g in groups])
    data = np.concatenate([x, copies * rng.uniform(0.5, 2.0, (len(copies), 1)).astype(np.float32)])  # scaled copies
    result = D.semdedup(data, eps=0.01, n_clusters=8, progress=False)
    assert len(result.keep) == 400  # every copy gone, nothing else
    start = 400
    for g in groups:
        family = np.concatenate([g[:1], np.arange(start, start + len(g) - 1)])
        start += len(g) - 1
        assert len(np.intersect1d(result.keep, family)) == 1


def test_semdedup_removes_nothing_from_orthogonal_embeddings():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    result = D.semdedup(q.astype(np.float32), eps=0.1, n_clusters=4, progress=False)
    assert result.keep.tolist() == list(range(64))
    assert np.nanmax(result.similarity) < 1e-5


def test_semdedup_similarity_matches_brute_force_in_small_blocks(monkeypatch):
    x = D.normalize(clustered(300, seed=2))
    brute = np.array([-1.0] + [(x[i] @ x[:i].T).max() for i in range(1, 300)])
    monkeypatch.setattr(semdedup_module, "BLOCK_ELEMENTS", 7 * 300)  # 7 rows per block
    assert np.allclose(D.max_earlier_similarity(x), brute, atol=1e-5)


def test_semdedup_with_a_keep_share_keeps_that_many_and_the_most_unique():
    x = clustered(500, seed=3, spread=0.05)
    result = D.semdedup(x, keep=0.4, n_clusters=5, progress=False)
    assert len(result.keep) == 200
    removed = np.setdiff1d(np.arange(500), result.keep)
    assert result.similarity[result.keep].max() <= result.similarity[removed].min()


def test_dbp_quotas_sum_to_the_target_and_none_exceeds_its_cluster():
    rng = np.random.default_rng(0)
    for trial in range(200):
        k = int(rng.integers(1, 40))
        sizes = rng.integers(0, 50, k)
        if sizes.sum() == 0:
            continue
        weights = D.softmax(rng.standard_normal(k) * rng.choice([0.1, 1, 10]), 0.5)
        target = int(rng.integers(0, sizes.sum() + 1))
        quotas = D.allocate_quotas(weights, sizes, target)
        assert quotas.sum() == target and (quotas <= sizes).all() and (quotas >= 0).all()
    # a dominant cluster smaller than its share keeps everything; the excess goes to the others in proportion
    assert D.allocate_quotas([0.9, 0.05, 0.05], [10, 100, 100], 110).tolist() == [10, 50, 50]


def test_density_based_selection_follows_complexity_and_keeps_the_hardest_in_each_cluster():
    rng = np.random.default_rng(0)
    directions = np.eye(16, dtype=np.float32)[:4] * 10
    spreads = np.array([0.2, 0.2, 2.0, 2.0], dtype=np.float32)  # clusters 2 and 3 are diffuse (complex)
    label = np.repeat(np.arange(4), 150)
    x = directions[label] + spreads[label, None] * rng.standard_normal((600, 16)).astype(np.float32)
    result = D.density_based_selection(x, 0.3, n_clusters=4, progress=False)
    assert len(result.keep) == 180 and result.quotas.sum() == 180 and (result.quotas <= result.sizes).all()
    kept_per_true_cluster = np.bincount(label[result.keep], minlength=4)
    assert kept_per_true_cluster[2:].min() > kept_per_true_cluster[:2].max()  # diffuse clusters keep more
    assert np.allclose(result.complexity, result.d_inter * result.d_intra)
    expected_share = D.softmax(result.complexity, 0.5)
    assert np.allclose(result.quotas / 180, expected_share, atol=0.02)
    clusters = result.clustering
    for members, quota in zip(clusters.members(), result.quotas):  # hardest = least similar to the centroid
        kept = np.intersect1d(members, result.keep)
        assert len(kept) == quota
        if 0 < quota < len(members):
            dropped = np.setdiff1d(members, kept)
            assert clusters.similarity[kept].max() <= clusters.similarity[dropped].min()


def test_sklearn_and_faiss_backends_find_the_same_well_separated_clusters():
    x = clustered(300, centers=3, spread=0.05, seed=4)
    truth = D.kmeans(D.prepare(x), 3, backend="sklearn", progress=False).labels
    if D.has_faiss():
        other = D.kmeans(D.prepare(x), 3, backend="faiss", progress=False).labels
        mapping = {a: b for a, b in zip(truth, other)}
        assert len(set(mapping.values())) == 3 and all(mapping[a] == b for a, b in zip(truth, other))
    sims, idx = D.nearest_centroids(np.eye(4, dtype=np.float32), 2, backend="sklearn")
    assert (idx != np.arange(4)[:, None]).all() and np.allclose(sims, 0.0)


def test_a_memory_mapped_npy_file_gives_the_same_result_as_the_array(tmp_path):
    x = clustered(500, seed=5)
    path = tmp_path / "emb.npy"
    np.save(path, x)
    from_file = D.density_based_selection(str(path), 0.3, n_clusters=5, progress=False)
    in_memory = D.density_based_selection(x, 0.3, n_clusters=5, progress=False)
    assert isinstance(D.load_embeddings(path), np.memmap)
    assert np.array_equal(from_file.keep, in_memory.keep)


def test_embed_images_returns_a_submodules_output_per_example_and_can_write_a_npy(tmp_path):
    from prunekit.data.train import SmallCNN

    torch.manual_seed(0)
    model, x = SmallCNN(width=4).train(), torch.rand(10, 1, 8, 8)
    features = D.embed_images(model, x, layer="features", batch_size=4, progress=False)
    with torch.no_grad():
        expected = model.eval().features(x).numpy()
    assert features.shape == (10, 128) and np.allclose(features, expected, atol=1e-6)
    model.train()
    written = D.embed_images(model, [(x[:6], None), (x[6:], None)], out=tmp_path / "f.npy", progress=False)
    assert model.training and np.allclose(np.load(tmp_path / "f.npy"), model.eval()(x).detach().numpy(), atol=1e-6)
    assert written.shape == (10, 10) and sorted(p.name for p in tmp_path.iterdir()) == ["f.npy"]
    with pytest.raises(ArgumentError, match="layer='feature' is not valid.*Did you mean 'features'"):
        D.embed_images(model, x, layer="feature")


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_nan_rows_are_refused_naming_how_many_or_dropped_on_request():
    x = clustered(200, seed=6)
    x[[3, 50, 77]] = np.nan
    x[120, 5] = np.inf
    with pytest.raises(ArgumentError, match=r"embeddings=.*4 of 200 rows holding NaN or inf.*nan_rows='drop'"):
        D.semdedup(x, eps=0.05, n_clusters=4, progress=False)
    result = D.density_based_selection(x, 0.5, n_clusters=4, nan_rows="drop", progress=False)
    assert result.dropped_nan == 4 and len(result.keep) == 98
    assert not np.isin([3, 50, 77, 120], result.keep).any()
    scores = D.prototype_scores(x, 4, nan_rows="drop", progress=False)
    assert np.isnan(scores[[3, 50, 77, 120]]).all() and np.isfinite(np.delete(scores, [3, 50, 77, 120])).all()
    with pytest.raises(ArgumentError, match="nan_rows='skip' is not valid"):
        D.prepare(x, nan_rows="skip")


@pytest.mark.parametrize("keep", [0, 0.0, -0.1, 1.5, float("nan"), "half", True])
def test_keep_fractions_outside_zero_one_are_refused(keep):
    with pytest.raises(ArgumentError, match=r"keep=.* is not valid: a fraction of the data set to keep, in \(0, 1\]"):
        D.select(np.arange(10.0), keep)
    with pytest.raises(ArgumentError, match="keep="):
        D.density_based_selection(clustered(50), keep, n_clusters=2, progress=False)


def test_labels_of_another_length_and_too_many_clusters_are_refused():
    with pytest.raises(ArgumentError, match=r"labels='9 labels' is not valid: one label per row of scores \(10 rows\)"):
        D.select(np.arange(10.0), 0.5, labels=np.zeros(9, dtype=int), class_balanced=True)
    with pytest.raises(ArgumentError, match=r"labels='4 labels'.*outputs \(5 rows\)"):
        D.el2n_scores(np.zeros((5, 3)), [0, 1, 2, 0])
    with pytest.raises(ArgumentError, match=r"n_clusters=51 is not valid: at most the number of usable embeddings"):
        D.semdedup(clustered(50), eps=0.1, n_clusters=51, progress=False)
    with pytest.raises(ArgumentError, match="exactly one of eps"):
        D.semdedup(clustered(50), eps=0.1, keep=0.5, n_clusters=2, progress=False)
    with pytest.raises(ArgumentError, match="history="):
        D.forgetting_counts([1, 2, 0])


# ---------------------------------------------------------------------------------------------------------------
# Real data


@pytest.fixture(scope="module")
def topic_paragraphs() -> list[str]:
    """Distinct paragraphs of Python's own documentation (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for part in topics[key].split("\n\n"):
            text = " ".join(part.split())
            if 80 < len(text) < 240 and text not in paragraphs:
                paragraphs.append(text)
    return paragraphs[:48]


@pytest.mark.slow
def test_minilm_embeddings_of_duplicated_sentences_collapse_to_one(topic_paragraphs):
    duplicated = [3, 17, 30, 31, 45]
    texts = topic_paragraphs + [topic_paragraphs[i] for i in duplicated] + [topic_paragraphs[30]]
    embeddings = D.embed_texts(texts, batch_size=64, progress=False)
    assert embeddings.shape == (len(texts), 384)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    result = D.semdedup(embeddings, eps=0.001, n_clusters=4, progress=False)
    assert len(result.keep) == len(topic_paragraphs)  # only the copies go: distinct paragraphs are never merged
    for i, copy in zip(duplicated, range(len(topic_paragraphs), len(texts))):
        assert (i in result.keep) != (copy in result.keep)
    assert sum(i in result.keep for i in (30, len(texts) - 1, len(topic_paragraphs) + 2)) == 1


@pytest.fixture(scope="module")
def noisy_digits():
    """The digits with 8% of the training labels flipped, and a small CNN's scoring run on them."""
    from prunekit.datasets import load_digits_tensors
    from prunekit.data.train import SmallCNN, train_steps

    x, y = load_digits_tensors()
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(y), int(0.08 * len(y)), replace=False)
    noisy = y.clone()
    noisy[flipped] = (noisy[flipped] + torch.as_tensor(rng.integers(1, 10, len(flipped)))) % 10
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains faster on one thread than on two busy ones
    try:
        run = train_steps(SmallCNN(), x, noisy, steps=300, batch_size=64, seed=0, track_forgetting=True,
                          snapshot_step=150, progress=False)
    finally:
        torch.set_num_threads(threads)
    return x, noisy, flipped, run


def _auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative."""
    is_positive = np.zeros(len(scores), dtype=bool)
    is_positive[positives] = True
    ranks = np.argsort(np.argsort(scores, kind="stable"), kind="stable") + 1
    n_pos, n_neg = is_positive.sum(), (~is_positive).sum()
    return float((ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_el2n_grand_and_forgetting_rank_mislabelled_real_digits_as_hardest(noisy_digits):
    from prunekit.data.train import predict

    x, noisy, flipped, run = noisy_digits
    el2n = D.el2n_scores(predict(run.snapshot, x), noisy)
    grand = D.grand_scores(run.snapshot, x, noisy, progress=False)
    forgetting = run.tracker.counts()
    assert _auc(el2n, flipped) > 0.9
    assert _auc(grand, flipped) > 0.9
    assert _auc(np.where(np.isinf(forgetting), 1e9, forgetting), flipped) > 0.7
    easy = D.select(el2n, 0.5, hardness="easy")  # keeping the easy half removes most of the label noise
    assert np.isin(flipped, easy).mean() < 0.2


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_select_writes_indices_and_a_json_report(tmp_path, capsys):
    x = clustered(400, seed=7)
    x[[10, 11]] = np.nan
    np.save(tmp_path / "emb.npy", x)
    out, report = tmp_path / "keep.txt", tmp_path / "report.json"
    code = main(["data", "select", "--method", "dbp", "--keep", "0.25", "--embeddings", str(tmp_path / "emb.npy"),
                 "--n-clusters", "6", "--nan-rows", "drop", "--out", str(out), "--report", str(report), "-q"])
    assert code == 0
    kept = D.read_indices(out)
    written = json.loads(report.read_text())
    assert len(kept) == written["kept"] == round(398 * 0.25) and written["dropped_nan_rows"] == 2
    assert sum(written["quotas"]) == written["kept"] and not np.isin([10, 11], kept).any()
    capsys.readouterr()


def test_cli_score_then_select_with_class_balance(tmp_path, capsys):
    rng = np.random.default_rng(0)
    logits, labels = rng.standard_normal((300, 4)), np.repeat([0, 1, 2], 100)
    np.save(tmp_path / "logits.npy", logits)
    np.save(tmp_path / "labels.npy", labels)
    assert main(["data", "score", "--method", "el2n", "--logits", str(tmp_path / "logits.npy"), "--labels",
                 str(tmp_path / "labels.npy"), "--out", str(tmp_path / "el2n.npy"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    scores = np.load(tmp_path / "el2n.npy")
    assert printed["n_examples"] == 300 and np.allclose(scores, D.el2n_scores(logits, labels))
    assert main(["data", "select", "--method", "el2n", "--scores", str(tmp_path / "el2n.npy"), "--keep", "0.1",
                 "--class-balanced", "--labels", str(tmp_path / "labels.npy"), "--out", str(tmp_path / "k.npy"),
                 "-q"]) == 0
    kept = np.load(tmp_path / "k.npy")
    assert np.bincount(labels[kept]).tolist() == [10, 10, 10]
    assert np.array_equal(kept, D.select(scores, 0.1, labels=labels, class_balanced=True))


@pytest.mark.parametrize("argv, message", [
    (["--method", "dbp", "--keep", "1.5"], "--keep=1.5 is not valid"),
    (["--method", "el2m", "--keep", "0.5"], "Did you mean 'el2n'"),
    (["--method", "grand", "--keep", "0.5"], "grand needs --dataset"),
    (["--method", "dbp", "--keep", "0.5", "--nan-rows", "drop", "--n-clusters", "500"],
     "n_clusters=500 is not valid: at most the number of usable embeddings (99)"),
    (["--method", "semdedup", "--eps", "0.1", "--n-clusters", "4"], "1 of 100 rows holding NaN or inf"),
    (["--method", "dbp", "--keep", "0.5", "--out", "keep.csv"], "a file name ending in .npy or .txt"),
    (["--method", "prototypes", "--keep", "0.5", "--nan-rows", "drop", "--n-clusters", "4", "--class-balanced",
      "--labels", "labels.npy"], "--labels='99 labels' is not valid: one per example (100 rows in --embeddings"),
    (["--method", "el2n", "--keep", "0.5", "--scores", "emb.npy.txt"],
     "--scores='emb.npy.txt' is not valid: an existing file"),
])
def test_cli_bad_input_is_one_error_line_and_writes_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    x = clustered(100)
    x[0] = np.nan
    np.save(tmp_path / "emb.npy", x)
    np.save(tmp_path / "labels.npy", np.zeros(99, dtype=np.int64))
    out = [] if "--out" in argv else ["--out", "keep.npy"]
    code = main(["data", "select", *argv, "--embeddings", "emb.npy", *out, "--report", "r.json", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy", "labels.npy"]
