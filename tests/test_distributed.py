"""Data-parallel calibration over torch.distributed (gloo, 2 processes on this machine): the same masks as one
process, for Wanda and SparseGPT, with a sample count the world size does not divide."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")

N_SAMPLES = 5  # odd: rank 0 gets 3 samples, rank 1 gets 2


def _tiny_llama(vocab_size: int = 256) -> torch.nn.Module:
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _samples() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (1, 24 + 3 * i), generator=generator) for i in range(N_SAMPLES)]


def _prune(method: str) -> dict[str, torch.Tensor]:
    import prunekit

    torch.set_num_threads(1)
    model = _tiny_llama()
    report = prunekit.prune(model, method, 0.5, data=_samples(), apply="bake", progress=False)
    assert report.extra["calibration_samples"] == N_SAMPLES
    return {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("proj.weight")}


def _rank(rank: int, world: int, init_file: str, method: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        weights = _prune(method)
        torch.save(weights, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_two_gloo_processes_give_the_masks_of_one(tmp_path, method):
    single = _prune(method)
    out = str(tmp_path / "weights")
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), method, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(2)]
    for name, weight in single.items():
        assert torch.equal(ranks[0][name] != 0, weight != 0), name  # the same mask as one process
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # every rank ends with the same weights
        torch.testing.assert_close(ranks[0][name], weight, rtol=1e-4, atol=1e-5)  # sums in another order only


def test_a_world_larger_than_the_samples_is_refused():
    from prunekit.distributed import shard
    from prunekit.errors import PruneError

    assert [shard(list(range(5)), r, 2) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert sum((shard(list(range(7)), r, 3) for r in range(3)), []) == list(range(7))
    with pytest.raises(PruneError, match="3 calibration samples cannot be shared by 4 ranks"):
        shard([0, 1, 2], 0, 4)


def test_torchrun_cli_writes_the_one_process_model_once(tmp_path):
    """`torchrun --nproc_per_node 2 -m prunekit prune ...`: rank 0 alone writes a folder with the one-process masks."""
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file

    from prunekit.zoo import smollm2_135m

    folder = tmp_path / "tiny"
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_135m())  # the real tokenizer, a tiny random model
    _tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torchrun = shutil.which("torchrun", path=str(os.path.dirname(sys.executable))) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    common = ["prune", str(folder), "--method", "wanda", "--sparsity", "0.5", "--n-samples", "5", "--seq-len", "24",
              "--no-eval", "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "prunekit", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "prunekit", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name] != 0, b[name] != 0), name


# --- SparseGPT's owner-rank solve, and failures across ranks --------------------------------------------------------


def _solve_and_record_layers(rank: int, _folder: str) -> dict:
    """Prune with SparseGPT, recording the layers this rank's solver ran on."""
    import prunekit.llm

    solved: list[str] = []
    prune_group = prunekit.llm.prune_group

    def counting(targets, *args):
        solved.extend(target.name for target in targets)
        return prune_group(targets, *args)

    prunekit.llm.prune_group = counting
    weights = _prune("sparsegpt")
    return {"solved": solved, "layers": sorted(name.removesuffix(".weight") for name in weights)}


def _prune_with_another_version(rank: int, _folder: str) -> dict:
    import prunekit

    if rank == 1:
        prunekit.__version__ = "0.0.0+other"
    _prune("wanda")
    return {"finished": True}


def _fail_in_block_1(how: str):
    def hook(_module, _args):
        if how == "exit":
            os._exit(1)  # a crash: no exception handling, the process and its sockets are gone
        raise RuntimeError("rank 1 failed on purpose")
    return hook


def _prune_while_rank_1_fails(rank: int, how: str) -> dict:
    import prunekit

    torch.set_num_threads(1)
    model = _tiny_llama()
    if rank == 1:
        model.model.layers[1].register_forward_pre_hook(_fail_in_block_1(how))
    prunekit.prune(model, "sparsegpt", 0.5, data=_samples(), apply="bake", progress=False)
    return {"finished": True}


def _save_pruned_while_rank_1_crashes(rank: int, folder: str) -> dict:
    """The `prunekit prune` job (pipeline.prune_language_model) with --out, rank 1 crashing before block 1's sums."""
    import prunekit.llm
    from prunekit.pipeline import prune_language_model

    torch.set_num_threads(1)
    if rank == 1:
        prune_block, calls = prunekit.llm.prune_block, []

        def crash_on_block_1(*args):
            calls.append(args)
            if len(calls) == 2:
                os._exit(1)
            return prune_block(*args)

        prunekit.llm.prune_block = crash_on_block_1
    prune_language_model(os.path.join(folder, "tiny"), "wanda", 0.5, n_samples=5, seq_len=24, evaluate=False,
                         out=os.path.join(folder, "pruned"), progress=False, log=lambda message: None)
    return {"finished": True}


SCENARIOS = {"solve": _solve_and_record_layers, "version": _prune_with_another_version,
             "raise": lambda rank, _folder: _prune_while_rank_1_fails(rank, "raise"),
             "exit": lambda rank, _folder: _prune_while_rank_1_fails(rank, "exit"),
             "save": _save_pruned_while_rank_1_crashes}


def _scenario_rank(rank: int, world: int, folder: str, scenario: str) -> None:
    """One rank of a scenario: its result, or its error as "Type: message", goes to folder/result.rank<r>."""
    import json
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world,
                            timeout=timedelta(seconds=20))  # a silent peer is given up on within the test's time
    try:
        result = SCENARIOS[scenario](rank, folder)
    except Exception as error:  # noqa: BLE001 - the test checks which error each rank saw
        result = {"error": f"{type(error).__name__}: {error}"}
    with open(f"{folder}/result.rank{rank}", "w") as file:
        json.dump(result, file)
    dist.destroy_process_group()


def _run_scenario(tmp_path, scenario: str) -> tuple[list[int], list[dict | None]]:
    """Run a scenario on 2 processes; (exit codes, per-rank results, None for a rank that wrote none). Unlike
    mp.spawn, a failing rank does not get the other one killed, so the survivor's own error can be checked."""
    import json

    context = mp.get_context("spawn")
    processes = [context.Process(target=_scenario_rank, args=(rank, 2, str(tmp_path), scenario)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=180)
    for process in processes:
        if process.is_alive():
            process.kill()
            pytest.fail(f"a rank of {scenario!r} still runs after 180 s: a collective hangs")
    paths = [tmp_path / f"result.rank{rank}" for rank in range(2)]
    results = [json.loads(path.read_text()) if path.exists() else None for path in paths]
    return [process.exitcode for process in processes], results


def test_sparsegpt_layers_are_each_solved_by_one_rank(tmp_path):
    codes, (zero, one) = _run_scenario(tmp_path, "solve")
    assert codes == [0, 0]
    assert zero["solved"] and one["solved"]  # both ranks take a share of the solves
    assert not set(zero["solved"]) & set(one["solved"])  # no layer is solved twice
    assert sorted(zero["solved"] + one["solved"]) == zero["layers"]  # and none is left out


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_rank_failing_mid_run_stops_the_other_with_a_clear_error(tmp_path, how):
    codes, (zero, one) = _run_scenario(tmp_path, how)
    assert zero["error"].startswith("ModelError: distributed calibration stopped: another rank failed"), zero
    if how == "raise":
        assert one == {"error": "RuntimeError: rank 1 failed on purpose"}
    else:
        assert codes[1] == 1 and one is None


def test_a_rank_crashing_mid_run_leaves_no_output_folder(tmp_path):
    from prunekit.zoo import smollm2_135m

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_135m())  # as in the torchrun test above
    _tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    codes, (zero, _) = _run_scenario(tmp_path, "save")
    assert codes[1] == 1
    assert zero["error"].startswith("ModelError: distributed calibration stopped: another rank failed"), zero
    assert not (tmp_path / "pruned").exists()  # rank 0 writes only once every block is pruned


def test_ranks_with_different_prunekit_versions_refuse_to_run(tmp_path):
    import prunekit

    _, results = _run_scenario(tmp_path, "version")
    for result in results:  # both ranks refuse, naming each rank's version
        assert result["error"] == ("PruneError: the ranks run different prunekit versions (rank 0: "
                                   f"{prunekit.__version__}, rank 1: 0.0.0+other); install one version everywhere")


def test_sparsegpt_owners_balance_the_solves():
    from prunekit.distributed import assign_owners, shared_input_groups, solve_cost
    from prunekit.activations import InputStats

    hidden, shared_mlp = InputStats(4), InputStats(4)
    stats = {"q": hidden, "k": hidden, "v": hidden, "o": InputStats(4), "gate": shared_mlp, "up": shared_mlp,
             "down": InputStats(8)}
    assert shared_input_groups(list(stats), stats) == [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]
    assert assign_owners([1.0, 5.0, 3.0, 3.0], 2) == [0, 0, 1, 1]  # costliest first, each to the least loaded
    assert assign_owners([2.0, 2.0], 3) == [0, 1]  # more ranks than groups: the last ranks idle
    assert assign_owners([], 2) == []
    assert solve_cost(576, [1536]) == 576**2 * (576 + 1536)
    assert solve_cost(576, [576, 192, 192]) == 576**3 + 576**2 * (576 + 192 + 192)  # one inverse for q/k/v


def test_the_collective_timeout_comes_from_the_environment():
    from datetime import timedelta

    from prunekit.distributed import backend_for, timeout_from_environment
    from prunekit.errors import ArgumentError

    assert timeout_from_environment({}) == timedelta(minutes=30)
    assert timeout_from_environment({"PRUNEKIT_DIST_TIMEOUT": "90"}) == timedelta(seconds=90)
    for bad in ("0", "-5", "soon", "nan", "inf"):
        with pytest.raises(ArgumentError, match="PRUNEKIT_DIST_TIMEOUT"):
            timeout_from_environment({"PRUNEKIT_DIST_TIMEOUT": bad})
    assert backend_for(False) == "gloo"
    assert backend_for(True) == "cpu:gloo,cuda:nccl"  # the statistics stay on the CPU even with GPUs


def test_the_device_is_this_ranks_gpu_or_the_cpu_and_bad_names_are_refused(monkeypatch):
    from prunekit.distributed import resolve_device
    from prunekit.errors import ArgumentError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ArgumentError, match="device.*no CUDA device"):
        resolve_device("cuda:1")
    with pytest.raises(ArgumentError, match="device.*auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "6")
    assert resolve_device("auto") == torch.device("cuda", 2)  # LOCAL_RANK modulo the GPUs this node has
