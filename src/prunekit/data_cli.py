"""`prunekit data score` and `prunekit data select`: dataset pruning from the command line.

Inputs: embeddings (.npy, memory-mapped), texts (one per line, embedded with all-MiniLM-L6-v2), saved logits or
correctness histories (.npy), or a bundled image data set (digits, fashion-mnist) on which a small CNN is trained
for the model-based scores. Outputs: scores (.npy) or kept indices (.npy or .txt), plus a JSON report; both are
written atomically, and only after every input has been checked and the work is done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ArgumentError

SCORE_METHODS = ("el2n", "grand", "forgetting", "prototypes", "semdedup", "random")
SELECT_METHODS = ("el2n", "grand", "forgetting", "prototypes", "semdedup", "dbp", "random")
EMBEDDING_METHODS = ("prototypes", "semdedup", "dbp")
DATASETS = ("digits", "fashion-mnist")
DEFAULT_STEPS = 500


def register(subparsers: Any) -> None:
    """Add `prunekit data {score,select}`."""
    data = subparsers.add_parser("data", help="dataset pruning: score examples, select the subset to keep")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    score = sub.add_parser("score", help="per-example scores (higher = harder) to a .npy file")
    score.add_argument("--method", required=True, help=", ".join(SCORE_METHODS))
    _inputs(score)
    score.add_argument("--out", required=True, metavar="FILE.npy", help="scores, one float per example")
    _common(score)
    score.set_defaults(run=cmd_score)

    select = sub.add_parser("select", help="indices of the examples to keep, to .npy or .txt")
    select.add_argument("--method", required=True, help=", ".join(SELECT_METHODS))
    select.add_argument("--keep", type=float, help="share of the examples to keep, in (0, 1]")
    select.add_argument("--scores", metavar="FILE.npy", help="scores from `prunekit data score` (score methods)")
    _inputs(select)
    select.add_argument("--hardness", default="hard", help="keep the hardest (hard, default) or easiest (easy)")
    select.add_argument("--class-balanced", action="store_true", help="keep the same share of every class")
    select.add_argument("--eps", type=float, help="semdedup: remove rows with similarity > 1 - eps (instead of --keep)")
    select.add_argument("--tau", type=float, default=0.5, help="dbp: softmax temperature (default 0.5)")
    select.add_argument("--n-neighbors", type=int, default=20, help="dbp: neighbouring centroids for d_inter (20)")
    select.add_argument("--dedup-eps", type=float, help="dbp: run SemDeDup with this eps first")
    select.add_argument("--out", required=True, metavar="FILE", help="kept indices: FILE.npy or FILE.txt")
    _common(select)
    select.set_defaults(run=cmd_select)


def _inputs(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inputs")
    group.add_argument("--embeddings", metavar="FILE.npy", help="(N, D) embeddings, read memory-mapped")
    group.add_argument("--texts", metavar="FILE", help="one text per line, embedded with all-MiniLM-L6-v2")
    group.add_argument("--dataset", help="train a small CNN on a bundled data set: " + ", ".join(DATASETS))
    group.add_argument("--logits", metavar="FILE.npy", help="el2n: (N, C) or (models, N, C) logits")
    group.add_argument("--history", metavar="FILE.npy", help="forgetting: (T, N) correctness per presentation")
    group.add_argument("--labels", metavar="FILE.npy", help="class labels (el2n with --logits, --class-balanced)")
    group.add_argument("--nan-rows", default="refuse", help="embeddings rows with NaN/inf: refuse (default) or drop")
    group.add_argument("--n-clusters", type=int, default=100, help="k-means clusters (default 100)")
    group.add_argument("--backend", default="auto", help="k-means / neighbour search: auto (faiss if installed), "
                       "faiss or sklearn")
    group.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                       help=f"--dataset: training steps of the scoring CNN (default {DEFAULT_STEPS})")
    group.add_argument("--seed", type=int, default=0)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report", metavar="FILE.json", help="write the JSON report here too")
    parser.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


# ---------------------------------------------------------------------------------------------------------------
# Checks that run before any work


def _existing(path: str | None, argument: str) -> Path | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise ArgumentError(argument, path, "an existing file")
    return Path(path)


def _output(path: str, argument: str, suffixes: tuple[str, ...]) -> Path:
    out = Path(path)
    if out.suffix not in suffixes:
        raise ArgumentError(argument, path, "a file name ending in " + " or ".join(suffixes))
    if not out.parent.is_dir():
        raise ArgumentError(argument, path, f"a file in an existing folder ({out.parent} does not exist)")
    return out


def _check_args(args: argparse.Namespace, methods: tuple[str, ...]) -> None:
    """Every cheap check: method, inputs the method needs, numbers, files, output paths."""
    from .data.checks import check_choice, check_count, check_fraction
    from .data.cluster import resolve_backend
    from .data.embeddings import NAN_POLICIES

    check_choice(args.method, "--method", methods)
    check_choice(args.nan_rows, "--nan-rows", NAN_POLICIES)
    resolve_backend(args.backend)
    check_count(args.n_clusters, "--n-clusters")
    check_count(args.steps, "--steps")
    if args.dataset is not None:
        check_choice(args.dataset, "--dataset", DATASETS)
    for argument in ("embeddings", "texts", "logits", "history", "labels"):
        _existing(getattr(args, argument), f"--{argument}")
    sources = [name for name in ("embeddings", "texts", "dataset") if getattr(args, name) is not None]
    if len(sources) > 1:
        raise ArgumentError("--" + sources[1], getattr(args, sources[1]),
                            f"one input at a time (--{sources[0]} is given too)")
    _check_label_count(args)
    method = args.method
    needs = {
        "el2n": ("--logits with --labels, or --dataset", args.logits is not None and args.labels is not None
                 or args.dataset is not None),
        "grand": ("--dataset (a model is trained to take per-example gradients)", args.dataset is not None),
        "forgetting": ("--history or --dataset", args.history is not None or args.dataset is not None),
        "random": ("any input that fixes the number of examples", bool(sources) or args.labels is not None
                   or getattr(args, "scores", None) is not None),
    }
    for name in EMBEDDING_METHODS:
        needs[name] = ("--embeddings, --texts or --dataset", bool(sources))
    allowed, given = needs[method]
    if getattr(args, "scores", None) is not None:
        _existing(args.scores, "--scores")
        if method in EMBEDDING_METHODS[1:]:
            raise ArgumentError("--scores", args.scores, f"not used by {method} (it needs embeddings)")
        given = True
    if not given:
        raise ArgumentError("--method", method, f"{method} needs {allowed}")
    if hasattr(args, "keep"):
        if method == "semdedup" and args.eps is not None:
            if args.keep is not None:
                raise ArgumentError("--eps", args.eps, "either --eps or --keep for semdedup, not both")
        elif args.keep is None:
            raise ArgumentError("--keep", None, "a share of the examples to keep, in (0, 1]"
                                + (" (or --eps for semdedup)" if method == "semdedup" else ""))
        else:
            check_fraction(args.keep, "--keep")
        check_choice(args.hardness, "--hardness", ("hard", "easy"))
        if args.class_balanced and args.labels is None and args.dataset is None:
            raise ArgumentError("--class-balanced", True, "needs class labels: --labels FILE.npy or --dataset")
        if args.class_balanced and method in ("semdedup", "dbp"):
            raise ArgumentError("--class-balanced", True, "used by score methods only (not semdedup or dbp)")


def _npy_header(path: str, argument: str) -> np.ndarray:
    """A .npy file memory-mapped (only its header is read now); an unreadable file is an ArgumentError."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ArgumentError(argument, path, f"a readable .npy array ({error})") from None
    if array.ndim == 0:
        raise ArgumentError(argument, path, "an array with one row per example, not a scalar")
    return array


def _check_label_count(args: argparse.Namespace) -> None:
    """--labels must have one entry per row of the input that fixes the number of examples (read from .npy headers)."""
    if args.labels is None:
        return
    labels = len(_npy_header(args.labels, "--labels"))
    for name in ("scores", "embeddings", "logits"):
        path = getattr(args, name, None)
        if path is not None:
            array = _npy_header(path, f"--{name}")
            rows = array.shape[-2] if name == "logits" and array.ndim == 3 else len(array)
            if rows != labels:
                raise ArgumentError("--labels", f"{labels} labels", f"one per example ({rows} rows in --{name} {path})")


# ---------------------------------------------------------------------------------------------------------------
# Work


def _log(args: argparse.Namespace) -> Callable[[str], None]:
    return (lambda _message: None) if args.quiet else (lambda message: print(message, file=sys.stderr))


def _load_dataset(name: str) -> tuple[Any, Any]:
    from .datasets import load_digits_tensors, load_fashion_mnist

    return load_digits_tensors() if name == "digits" else load_fashion_mnist("train")


def _dataset_run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Train the scoring CNN on the data set: labels, EL2N/GraNd snapshot, forgetting counts, embeddings."""
    import torch

    from .data.train import SmallCNN, penultimate, train_steps

    x, y = _load_dataset(args.dataset)
    torch.manual_seed(args.seed)
    model = SmallCNN(in_channels=x.shape[1], num_classes=int(y.max()) + 1)
    snapshot = max(1, args.steps // 5)  # "early in training", as Paul et al. score EL2N and GraNd
    log(f"training a small CNN on {len(y)} {args.dataset} images for {args.steps} steps (snapshot at {snapshot})")
    run = train_steps(model, x, y, steps=args.steps, seed=args.seed, track_forgetting=True, snapshot_step=snapshot,
                      progress=not args.quiet)
    return {"x": x, "y": y.numpy(), "snapshot": run.snapshot, "forgetting": run.tracker.counts(),
            "model": model, "embeddings": lambda: penultimate(model, x), "snapshot_step": snapshot}


def _embeddings(args: argparse.Namespace, run: dict[str, Any] | None) -> Any:
    from .data import embed_texts, load_embeddings

    if args.embeddings is not None:
        return load_embeddings(args.embeddings)
    if args.texts is not None:
        texts = [line for line in Path(args.texts).read_text(encoding="utf-8").splitlines()]
        return embed_texts(texts, progress=not args.quiet)
    return run["embeddings"]()


def _n_examples(args: argparse.Namespace, run: dict[str, Any] | None) -> int:
    if run is not None:
        return len(run["y"])
    if args.embeddings is not None:
        return len(_npy_header(args.embeddings, "--embeddings"))
    if args.texts is not None:
        return len(Path(args.texts).read_text(encoding="utf-8").splitlines())
    if getattr(args, "scores", None) is not None:
        return len(_npy_header(args.scores, "--scores"))
    if args.dataset is not None:
        return len(_load_dataset(args.dataset)[1])
    return len(_npy_header(args.labels, "--labels"))


def compute_scores(args: argparse.Namespace, run: dict[str, Any] | None, info: dict[str, Any]) -> np.ndarray:
    """Scores for a score method (higher = harder)."""
    from . import data as D

    method = args.method
    if method == "random":
        return D.random_scores(_n_examples(args, run), args.seed)
    if method == "el2n":
        if run is not None:
            from .data.train import predict

            return D.el2n_scores(predict(run["snapshot"], run["x"]), run["y"])
        return D.el2n_scores(np.asarray(_npy_header(args.logits, "--logits")),
                             np.asarray(_npy_header(args.labels, "--labels")))
    if method == "grand":
        return D.grand_scores(run["snapshot"], run["x"], run["y"], progress=not args.quiet)
    if method == "forgetting":
        return run["forgetting"] if run is not None else D.forgetting_counts(
            np.asarray(_npy_header(args.history, "--history")))
    embeddings = D.prepare(_embeddings(args, run), args.nan_rows)
    info["dropped_nan_rows"] = embeddings.dropped
    clustering = D.kmeans(embeddings, args.n_clusters, seed=args.seed, backend=args.backend, progress=not args.quiet)
    info["backend"] = clustering.backend
    if method == "prototypes":
        return D.prototype_scores(embeddings, args.n_clusters, clustering=clustering)
    return D.semdedup(embeddings, keep=1.0, clustering=clustering, progress=not args.quiet).similarity


def _labels(args: argparse.Namespace, run: dict[str, Any] | None) -> np.ndarray | None:
    if run is not None:
        return run["y"]
    if args.labels is not None:
        return np.asarray(_npy_header(args.labels, "--labels"))
    return None if args.dataset is None else _load_dataset(args.dataset)[1].numpy()


def _summary(scores: np.ndarray) -> dict[str, float]:
    finite = scores[np.isfinite(scores)]
    if not len(finite):
        return {}
    return {"min": float(finite.min()), "median": float(np.median(finite)), "max": float(finite.max()),
            "infinite": int(np.isinf(scores).sum()), "nan": int(np.isnan(scores).sum())}


def _finish(args: argparse.Namespace, report: dict[str, Any]) -> int:
    from .data import write_json

    if args.report:
        write_json(report, args.report)
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    elif not args.quiet:
        print(f"{report['output']}: " + ", ".join(f"{k} {v}" for k, v in report["summary"].items()))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """prunekit data score."""
    _check_args(args, SCORE_METHODS)
    out = _output(args.out, "--out", (".npy",))
    if args.report:
        _output(args.report, "--report", (".json",))
    log = _log(args)
    run = _dataset_run(args, log) if args.dataset is not None and args.method != "random" else None
    info: dict[str, Any] = {}
    scores = compute_scores(args, run, info)
    _save_npy(np.asarray(scores, dtype=np.float64), out)
    report = {"command": "data score", "method": args.method, "n_examples": int(len(scores)), "output": str(out),
              "inputs": _inputs_of(args), "summary": _summary(scores), **info}
    return _finish(args, report)


def _save_npy(array: np.ndarray, path: Path) -> None:
    """np.save via a temp file and os.replace."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    try:
        np.save(temp, array)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _inputs_of(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("embeddings", "texts", "dataset", "logits", "history", "labels", "scores", "n_clusters", "backend",
            "steps", "seed", "nan_rows")
    return {key: getattr(args, key) for key in keys if getattr(args, key, None) is not None}


def cmd_select(args: argparse.Namespace) -> int:
    """prunekit data select."""
    from . import data as D

    _check_args(args, SELECT_METHODS)
    out = _output(args.out, "--out", (".npy", ".txt"))
    if args.report:
        _output(args.report, "--report", (".json",))
    log = _log(args)
    needs_run = args.dataset is not None and args.scores is None and args.method != "random"
    run = _dataset_run(args, log) if needs_run else None
    info: dict[str, Any] = {}
    method = args.method
    if method == "dbp":
        embeddings = D.prepare(_embeddings(args, run), args.nan_rows)
        result = D.density_based_selection(
            embeddings, args.keep, n_clusters=args.n_clusters, tau=args.tau, n_neighbors=args.n_neighbors,
            hardness=args.hardness, dedup_eps=args.dedup_eps, seed=args.seed, backend=args.backend,
            progress=not args.quiet)
        keep, n = result.keep, len(embeddings.array)
        info.update(result.info, dropped_nan_rows=result.dropped_nan, quotas=result.quotas.tolist(),
                    cluster_sizes=result.sizes.tolist())
    elif method == "semdedup" and args.scores is None:
        embeddings = D.prepare(_embeddings(args, run), args.nan_rows)
        result = D.semdedup(embeddings, eps=args.eps, keep=args.keep, n_clusters=args.n_clusters, seed=args.seed,
                            backend=args.backend, progress=not args.quiet)
        keep, n = result.keep, len(embeddings.array)
        info.update(result.info, dropped_nan_rows=result.dropped_nan)
    else:
        scores = np.asarray(_npy_header(args.scores, "--scores")) if args.scores else compute_scores(args, run, info)
        if method == "semdedup":  # saved SemDeDup similarities: lower = more unique, so the 'easy' end is kept
            hardness = "easy"
        else:
            hardness = args.hardness
        keep = _select_scored(scores, _labels(args, run) if args.class_balanced else None, args, hardness)
        n = len(scores)
        info["score_summary"] = _summary(np.asarray(scores, dtype=np.float64))
    D.write_indices(keep, out)
    report = {"command": "data select", "method": method, "keep": args.keep, "hardness": args.hardness,
              "class_balanced": args.class_balanced, "n_examples": int(n), "kept": int(len(keep)),
              "output": str(out), "inputs": _inputs_of(args),
              "summary": {"kept": int(len(keep)), "of": int(n), "share": round(len(keep) / n, 6)}, **info}
    if method == "semdedup" and args.eps is not None:
        report["eps"] = args.eps
    return _finish(args, report)


def _source_name(args: argparse.Namespace) -> str:
    """The input that fixed the number of examples, for messages."""
    for name in ("scores", "embeddings", "texts", "dataset", "logits", "history"):
        if getattr(args, name, None) is not None:
            return f"--{name} {getattr(args, name)}"
    return "the input"


def _select_scored(scores: Any, labels: np.ndarray | None, args: argparse.Namespace, hardness: str) -> np.ndarray:
    """select() over the examples that have a score; NaN scores (rows dropped for NaN embeddings) are never kept."""
    from .data import select

    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1:
        raise ArgumentError("--scores", f"an array of shape {array.shape}", "one score per example (a 1-D array)")
    scored = np.flatnonzero(~np.isnan(array))
    if len(scored) < len(array) and args.nan_rows != "drop":
        raise ArgumentError("--scores", f"an array with {len(array) - len(scored)} NaN scores",
                            "a score for every example, or --nan-rows drop to leave those examples out")
    if len(scored) == 0:
        raise ArgumentError("--scores", "an array of NaN scores only", "at least one score")
    if labels is not None and len(labels) != len(array):
        raise ArgumentError("--labels", f"{len(labels)} labels",
                            f"one per example ({len(array)} rows in {_source_name(args)})")
    kept = select(array[scored], args.keep, hardness=hardness,
                  labels=None if labels is None else labels[scored], class_balanced=labels is not None)
    return scored[kept]
