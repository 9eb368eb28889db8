"""Out-of-core pruning (prunekit.streaming): blocks read from memory-mapped safetensors, pruned and written one at a
time give bitwise the model, masks and perplexities of the in-memory run; never more than one block is resident;
interrupted runs resume; bad input is refused by name."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import prunekit  # noqa: E402
from prunekit import streaming  # noqa: E402
from prunekit.errors import ArgumentError, ModelError, PruneError  # noqa: E402
from prunekit.evaluate import perplexity  # noqa: E402

WINDOW = 32


def _save_tiny_llama(folder: Path, tied: bool = True, max_shard_size: str | None = None) -> Path:
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      max_position_embeddings=128, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _samples(count: int = 5) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (1, 20 + 2 * i), generator=generator) for i in range(count)]


def _eval_ids() -> torch.Tensor:
    return torch.randint(0, 256, (4 * WINDOW + 5,), generator=torch.Generator().manual_seed(2))


def _folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    merged: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        merged.update(load_file(path))
    return merged


def _in_memory(folder: Path, method: str, **options):
    """The reference: the whole model loaded, pruned with prunekit.prune, perplexity before and after."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    dense = perplexity(model, _eval_ids(), window=WINDOW, max_tokens=None, progress=False)
    prunekit.prune(model, method, options.pop("sparsity", 0.5), data=_samples(), apply="bake", progress=False,
                   **options)
    pruned = perplexity(model, _eval_ids(), window=WINDOW, max_tokens=None, progress=False)
    return model, dense, pruned


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "owl"])
def test_out_of_core_gives_bitwise_the_in_memory_model_and_perplexities(tiny_folder, tmp_path, method):
    model, dense, pruned = _in_memory(tiny_folder, method)
    out = tmp_path / "pruned"
    report = streaming.prune_out_of_core(tiny_folder, _samples(), 0.5, out, method=method, eval_ids=_eval_ids(),
                                         eval_window=WINDOW, progress=False)
    written = _folder_tensors(out)
    reference = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: not saved
    assert set(written) == set(reference)
    assert all(torch.equal(written[k], reference[k]) for k in reference)
    assert math.isclose(report.extra["dense_perplexity"], dense, rel_tol=1e-12)
    assert math.isclose(report.extra["pruned_perplexity"], pruned, rel_tol=1e-12)
    assert report.sparsity == pytest.approx(0.5)
    # A folder plain transformers loads: one shard per block plus one for the rest, and an index.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 + 1
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(loaded.model.layers[2].mlp.down_proj.weight, model.model.layers[2].mlp.down_proj.weight)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    manifest = json.loads((out / "prunekit.json").read_text())
    assert manifest["method"] == method and set(manifest["files"]) == set(index["weight_map"].values())


def test_a_sharded_checkpoint_with_an_untied_head(tmp_path):
    source = _save_tiny_llama(tmp_path / "source", tied=False, max_shard_size="100KB")
    assert (source / "model.safetensors.index.json").is_file()
    model, _, _ = _in_memory(source, "sparsegpt", pattern="2:4", sparsity=None)
    streaming.prune_out_of_core(source, _samples(), None, tmp_path / "out", method="sparsegpt", pattern="2:4",
                                progress=False)
    written, reference = _folder_tensors(tmp_path / "out"), model.state_dict()
    assert set(written) == set(reference)  # the untied head is written
    assert all(torch.equal(written[k], reference[k]) for k in reference)


def test_never_more_than_one_block_is_in_memory(tiny_folder, tmp_path, monkeypatch):
    resident_blocks = []
    original = streaming.WeightMover.load

    def load(self, names, copy=True):
        original(self, names, copy)
        layers = self.model.model.layers
        resident_blocks.append(sum(any(not p.is_meta for p in block.parameters()) for block in layers))

    monkeypatch.setattr(streaming.WeightMover, "load", load)
    streaming.prune_out_of_core(tiny_folder, _samples(), 0.5, tmp_path / "out", method="sparsegpt", progress=False)
    assert resident_blocks and max(resident_blocks) == 1


def test_an_interrupted_run_resumes_and_ends_with_the_same_model(tiny_folder, tmp_path, monkeypatch):
    from prunekit import llm

    reference_out = tmp_path / "reference"
    streaming.prune_out_of_core(tiny_folder, _samples(), 0.5, reference_out, method="sparsegpt",
                                eval_ids=_eval_ids(), eval_window=WINDOW, progress=False)
    calls = []
    original = llm.prune_block

    def failing(feed, *args, **kwargs):
        calls.append(feed.index)
        if feed.index == 1 and len(calls) == 2:
            raise KeyboardInterrupt  # the user stops the run in block 1
        return original(feed, *args, **kwargs)

    monkeypatch.setattr(llm, "prune_block", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        streaming.prune_out_of_core(tiny_folder, _samples(), 0.5, out, method="sparsegpt", eval_ids=_eval_ids(),
                                    eval_window=WINDOW, progress=False)
    assert not out.exists()  # no half-written output
    staging = tmp_path / ".out.partial"
    assert json.loads((staging / "progress.json").read_text())["blocks_done"] == 1
    with pytest.raises(PruneError, match="other settings"):
        streaming.prune_out_of_core(tiny_folder, _samples(), 0.6, out, method="sparsegpt", progress=False)
    report = streaming.prune_out_of_core(tiny_folder, _samples(), 0.5, out, method="sparsegpt",
                                         eval_ids=_eval_ids(), eval_window=WINDOW, progress=False)
    assert calls == [0, 1, 1, 2]  # block 0 was not pruned again
    expected, written = _folder_tensors(reference_out), _folder_tensors(out)
    assert set(expected) == set(written) and all(torch.equal(expected[k], written[k]) for k in expected)
    reference_manifest = json.loads((reference_out / "prunekit.json").read_text())
    assert report.extra["pruned_perplexity"] == reference_manifest["extra"]["job"]["pruned_perplexity"]
    assert not staging.exists() and not (out / "progress.json").exists()


def test_bad_input_is_refused_by_name(tiny_folder, tmp_path):
    with pytest.raises(ArgumentError, match="method.*magnitude"):
        streaming.prune_out_of_core(tiny_folder, _samples(), 0.5, tmp_path / "a", method="magnitude")
    with pytest.raises(ArgumentError, match="calibration='one-pass'.*'sequential' out of core"):
        streaming.prune_out_of_core(tiny_folder, _samples(), 0.5, tmp_path / "a", calibration="one-pass")
    assert not (tmp_path / "a").exists()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match="pytorch_model.bin: pickle"):
        streaming.prune_out_of_core(pickled, _samples(), 0.5, tmp_path / "b")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ArgumentError, match="out"):
        streaming.prune_out_of_core(tiny_folder, _samples(), 0.5, foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_a_checkpoint_missing_a_tensor_names_it(tmp_path):
    from safetensors.torch import load_file, save_file

    source = _save_tiny_llama(tmp_path / "source")
    state = load_file(source / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="model.layers.1.mlp.up_proj.weight"):
        streaming.prune_out_of_core(source, _samples(), 0.5, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_safetensors_writer_round_trips_every_dtype(tmp_path):
    from safetensors.torch import load_file

    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "i64": torch.arange(4),
               "bool": torch.tensor([True, False]), "empty": torch.zeros(0, 3)}
    streaming.write_shard(tmp_path, "x.safetensors", tensors)
    loaded = load_file(tmp_path / "x.safetensors")
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def _streaming_rank(rank: int, world: int, init_file: str, folder: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        report = streaming.prune_out_of_core(folder, _samples(), 0.5, out, method="wanda", progress=False)
        assert report.extra["world_size"] == world
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_stream_to_the_one_process_folder(tiny_folder, tmp_path, one_thread):
    """Out of core under torch.distributed: every rank streams the blocks, rank 0 alone writes the same folder."""
    import torch.multiprocessing as mp

    streaming.prune_out_of_core(tiny_folder, _samples(), 0.5, tmp_path / "one", method="wanda", progress=False)
    mp.spawn(_streaming_rank, args=(2, str(tmp_path / "init"), str(tiny_folder), str(tmp_path / "two")), nprocs=2,
             join=True)
    one, two = _folder_tensors(tmp_path / "one"), _folder_tensors(tmp_path / "two")
    assert set(one) == set(two)
    assert all(torch.equal(one[k] != 0, two[k] != 0) for k in one)  # the same masks
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_offloaded_activations_change_nothing_and_leave_no_file(tiny_folder, tmp_path):
    streaming.prune_out_of_core(tiny_folder, _samples(), 0.5, tmp_path / "disk", method="owl-sparsegpt",
                                eval_ids=_eval_ids(), eval_window=WINDOW, progress=False)
    streaming.prune_out_of_core(tiny_folder, _samples(), 0.5, tmp_path / "ram", method="owl-sparsegpt",
                                eval_ids=_eval_ids(), eval_window=WINDOW, offload_activations=False, progress=False)
    disk, ram = _folder_tensors(tmp_path / "disk"), _folder_tensors(tmp_path / "ram")
    assert set(disk) == set(ram) and all(torch.equal(disk[k], ram[k]) for k in disk)
    manifests = [json.loads((tmp_path / name / "prunekit.json").read_text()) for name in ("disk", "ram")]
    assert manifests[0]["extra"]["job"]["pruned_perplexity"] == manifests[1]["extra"]["job"]["pruned_perplexity"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "ram"]  # the activations file is gone


def test_disk_activations_round_trip_samples_of_different_lengths(tmp_path):
    shapes = [(1, 5, 8), (1, 3, 8), (1, 1000, 8)]
    store = streaming.DiskActivations(shapes, torch.float32, tmp_path)
    tensors = [torch.randn(shape) for shape in shapes]
    views = [store.store(i, t) for i, t in enumerate(tensors)]
    store.drop_all()
    assert all(torch.equal(v, t) for v, t in zip(views, tensors))  # dropped pages read back from the file
    assert list(tmp_path.iterdir()) == []  # unlinked at once
