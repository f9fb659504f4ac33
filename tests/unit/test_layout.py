"""Layouts (serving/layout.py): the derived model repository's configs, parsed back with Triton's
model_config protobuf, place the models as asked and size preprocess to the machine; bad layouts are
refused with a reason."""
from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from internvl_serve.serving.layout import (REPOSITORY_PREPROCESS_INSTANCES, Layout, auto_preprocess_instances,
                                           available_cpus, parse_key_values, read_config, write_model_repository)
from internvl_serve.serving.launcher import LaunchError, layout_from_args, parse_args

REPO = Path(__file__).resolve().parents[2] / "model_repository"
GPU = mc.ModelInstanceGroup.KIND_GPU


def written(tmp_path, layout):
    out = write_model_repository(REPO, tmp_path / "models", layout)
    return {p.name: read_config(p / "config.pbtxt") for p in out.iterdir()}, out


def test_data_parallel_puts_one_vision_and_one_llm_instance_on_each_gpu(tmp_path):
    configs, out = written(tmp_path, Layout(gpus=(0, 1, 2)))
    for name in ("vision", "llm"):
        (group,) = configs[name].instance_group
        assert (group.kind, group.count, list(group.gpus)) == (GPU, 1, [0, 1, 2])
    assert configs["llm"].parameters["tensor_parallel_size"].string_value == "1"
    assert configs["preprocess"].instance_group == read_config(REPO / "preprocess/config.pbtxt").instance_group
    assert configs["internvl_chat"] == read_config(REPO / "internvl_chat/config.pbtxt")
    assert (out / "llm" / "1").resolve() == (REPO / "llm" / "1").resolve()  # the same code


def test_tensor_parallel_keeps_one_llm_instance_and_names_its_gpus(tmp_path):
    configs, _ = written(tmp_path, Layout(gpus=(2, 3), tensor_parallel_size=2,
                                          llm_parameters={"max_num_seqs": "64"}))
    llm = configs["llm"]
    assert [g.kind for g in llm.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    params = {k: v.string_value for k, v in llm.parameters.items()}
    assert params["tensor_parallel_size"] == "2" and params["tensor_parallel_devices"] == "cuda:2,cuda:3"
    assert params["device"] == "cuda:2" and params["max_num_seqs"] == "64"
    (vision,) = configs["vision"].instance_group
    assert list(vision.gpus) == [2]  # beside rank 0


@pytest.mark.parametrize("layout, words", [
    (Layout(gpus=(0, 1, 2, 3), tensor_parallel_size=2), "several tensor-parallel groups"),
    (Layout(gpus=(0, 0)), "distinct"),
    (Layout(tensor_parallel_size=0), ">= 1"),
    (Layout(preprocess_instances=0), "preprocess_instances must be >= 1"),
    (Layout(llm_parameters={"max_num_seq": "8"}), "no parameter 'max_num_seq'"),
    (Layout(vision_max_batch_size=0), "vision_max_batch_size must be >= 1"),
])
def test_bad_layouts_are_refused(tmp_path, layout, words):
    with pytest.raises(ValueError, match=words):
        write_model_repository(REPO, tmp_path / "models", layout)


def test_launcher_flags_make_the_layout():
    args = parse_args(["--gpus", "0,1", "--tensor-parallel-size", "2", "--llm-param", "quantization=int8"])
    layout = layout_from_args(args)
    assert layout == Layout(gpus=(0, 1), tensor_parallel_size=2, llm_parameters={"quantization": "int8"})
    with pytest.raises(LaunchError, match="key=value"):
        layout_from_args(parse_args(["--llm-param", "oops"]))
    assert parse_key_values(["a=1", "b = x=y"]) == {"a": "1", "b": "x=y"}


def test_preprocess_instances_follow_the_cpus_unless_given(tmp_path):
    assert REPOSITORY_PREPROCESS_INSTANCES == read_config(REPO / "preprocess" / "config.pbtxt").instance_group[0].count
    assert [auto_preprocess_instances(c) for c in (1, 2, 8, 11, 12, 16, 32, 64)] == [None] * 4 + [3, 4, 8, 8]
    configs, _ = written(tmp_path, Layout(preprocess_instances=5))
    assert [(g.kind, g.count) for g in configs["preprocess"].instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 5)]
    assert configs["vision"] == read_config(REPO / "vision" / "config.pbtxt")  # nothing else changes
    assert not Layout(preprocess_instances=5).is_default
    assert Layout().preprocess_count == auto_preprocess_instances()  # this machine's
    assert layout_from_args(parse_args(["--preprocess-instances", "6"])).preprocess_instances == 6
    assert layout_from_args(parse_args([])).preprocess_instances is None


def test_vision_max_batch_size_sets_only_the_vision_models_batch(tmp_path):
    configs, _ = written(tmp_path, Layout(vision_max_batch_size=2))
    vision = read_config(REPO / "vision" / "config.pbtxt")
    assert vision.max_batch_size == 8 and configs["vision"].max_batch_size == 2
    configs["vision"].max_batch_size = vision.max_batch_size
    assert configs["vision"] == vision  # nothing else of it changes
    assert configs["llm"] == read_config(REPO / "llm" / "config.pbtxt")
    assert not Layout(vision_max_batch_size=2).is_default
    assert layout_from_args(parse_args(["--vision-max-batch-size", "2"])).vision_max_batch_size == 2
    assert layout_from_args(parse_args([])).vision_max_batch_size is None
    with pytest.raises(LaunchError, match="vision_max_batch_size must be >= 1"):
        layout_from_args(parse_args(["--vision-max-batch-size", "0"]))


def test_vision_batch_cap_is_one_on_a_gpu_in_the_model_dtype(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Layout().vision_batch_cap is None  # the CPU: the repository's 8
    assert Layout(vision_parameters={"device": "cuda"}).vision_batch_cap == 1
    assert Layout(gpus=(0,)).vision_batch_cap == 1  # instances on GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Layout().vision_batch_cap == 1 and not Layout().is_default
    configs, _ = written(tmp_path, Layout())
    assert configs["vision"].max_batch_size == 1
    assert Layout(vision_parameters={"quantization": "fp8"}).vision_batch_cap is None  # batches help fp8
    assert Layout(vision_parameters={"device": "cpu"}).vision_batch_cap is None
    assert Layout(vision_max_batch_size=4).vision_batch_cap == 4  # as asked, anywhere
    assert Layout(vision_max_batch_size=8, vision_parameters={"device": "cpu"}).vision_batch_cap == 8


def test_a_server_without_a_layout_sizes_preprocess_to_the_machine(monkeypatch, tiny_checkpoint):
    from internvl_serve.serving.triton_server import TritonServer
    monkeypatch.setattr("internvl_serve.serving.layout.available_cpus", lambda: 16)
    assert TritonServer(tiny_checkpoint).layout == Layout()  # derived: 4 preprocess instances
    assert Layout().preprocess_count == 4
    monkeypatch.setattr("internvl_serve.serving.layout.available_cpus", lambda: 2)
    assert TritonServer(tiny_checkpoint).layout is None  # the repository as checked in


def test_available_cpus_sees_a_containers_cpu_limit(tmp_path):
    own = available_cpus(tmp_path / "missing")  # no cgroup file: the affinity
    assert own >= 1
    limit = tmp_path / "cpu.max"
    limit.write_text("150000 100000\n")  # 1.5 CPUs
    assert available_cpus(limit) == 1
    limit.write_text(f"{400000 * own} 100000\n")  # more than the affinity allows
    assert available_cpus(limit) == own
    limit.write_text("max 100000\n")
    assert available_cpus(limit) == own
