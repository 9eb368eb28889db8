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
