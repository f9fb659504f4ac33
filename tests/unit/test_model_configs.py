"""The checked-in config.pbtxt files, parsed as Triton parses them (protobuf text format into
tritonclient's ModelConfig), against the contract in internvl_serve/serving/contract.py."""
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from internvl_serve.serving import contract as c
from internvl_serve.serving.contract import ServingLimits

REPO = Path(__file__).resolve().parents[2] / "model_repository"
MODELS = (c.PREPROCESS, c.VISION, c.LLM, c.ENSEMBLE, c.ENSEMBLE_BLS)


def load(name: str) -> mc.ModelConfig:
    config = text_format.Parse((REPO / name / "config.pbtxt").read_text(), mc.ModelConfig())
    assert config.name == name, f"{name}/config.pbtxt names itself {config.name!r}"
    return config


def type_name(data_type: int) -> str:
    return mc.DataType.Name(data_type)


def tensors(entries) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {t.name: (type_name(t.data_type), tuple(t.dims)) for t in entries}


def spec_table(specs) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {s.name: (s.config_type, tuple(s.dims)) for s in specs}


def model_io(config: mc.ModelConfig) -> tuple[dict, dict]:
    """Inputs and outputs with full shapes (a batching model's batch dimension made explicit)."""
    def full(entries):
        out = tensors(entries)
        if config.max_batch_size > 0:
            out = {k: (t, (-1,) + dims) for k, (t, dims) in out.items()}
        return out
    return full(config.input), full(config.output)


def test_every_model_folder_is_parsed_and_has_version_1():
    assert sorted(p.name for p in REPO.iterdir() if p.is_dir()) == sorted(MODELS)
    for name in MODELS:
        load(name)
        assert (REPO / name / "1").is_dir()
    for name in (c.PREPROCESS, c.VISION, c.LLM):
        assert (REPO / name / "1" / "model.py").is_file()
        assert load(name).backend == "python"


def test_ensemble_interface_is_the_contract():
    config = load(c.ENSEMBLE)
    assert config.platform == "ensemble" and config.max_batch_size == 0
    assert tensors(config.input) == spec_table(c.ENSEMBLE_INPUTS)
    assert tensors(config.output) == spec_table(c.OUTPUTS)
    optional = {t.name for t in config.input if t.optional}
    # text_input is required by the contract but declared optional (contract.DECLARED_OPTIONAL)
    assert optional == {s.name for s in c.ENSEMBLE_INPUTS if s.optional} | set(c.DECLARED_OPTIONAL)


def test_composing_models_interfaces():
    pre, vis, llm = load(c.PREPROCESS), load(c.VISION), load(c.LLM)
    assert tensors(pre.input) == spec_table(c.CHAT_INPUTS + c.GENERATION_INPUTS)
    assert tensors(pre.output) == spec_table([c.INPUT_IDS, c.PIXEL_VALUES])
    assert tensors(llm.input) == spec_table(c.LLM_INPUTS)
    assert all(t.optional for t in llm.input)  # a cancellation request carries only its id and key
    assert tensors(llm.output) == spec_table(c.OUTPUTS)
    assert tensors(vis.input) == {"pixel_values": ("TYPE_FP32", c.VISION_INPUT_DIMS)}
    assert tensors(vis.output) == {"image_embeds": ("TYPE_FP32", c.VISION_OUTPUT_DIMS)}
    assert llm.max_batch_size == 0
    for config in (pre,):
        assert config.max_batch_size == 0
        assert {t.name for t in config.input if not t.optional} == ({
            s.name for s in list(c.ENSEMBLE_INPUTS) + [c.INPUT_IDS, c.IMAGE_EMBEDS] if not s.optional
        } & {t.name for t in config.input}) - set(c.DECLARED_OPTIONAL)


def test_llm_is_decoupled_and_vision_batches_dynamically():
    assert load(c.LLM).model_transaction_policy.decoupled is True
    assert load(c.PREPROCESS).model_transaction_policy.decoupled is False
    vis = load(c.VISION)
    assert vis.max_batch_size >= 2 and vis.HasField("dynamic_batching")
    assert all(t.allow_ragged_batch for t in vis.input)  # each request has its own number of images


def test_instances_run_on_cpu_kind():
    # The Python models pick CUDA themselves (parameter 'device'); Triton's KIND_CPU is right for both.
    for name in (c.PREPROCESS, c.VISION, c.LLM):
        groups = load(name).instance_group
        assert groups and all(g.kind == mc.ModelInstanceGroup.KIND_CPU and g.count >= 1 for g in groups)


def test_device_parameter_values():
    for name in (c.VISION, c.LLM):
        params = load(name).parameters
        assert params["device"].string_value in ("auto", "cpu", "cuda")


def test_preprocess_limits_parameters_parse():
    params = {k: v.string_value for k, v in load(c.PREPROCESS).parameters.items()}
    limits = ServingLimits.from_parameters(params)
    assert set(params) <= {f for f in ServingLimits.__dataclass_fields__}
    assert limits == ServingLimits()  # the checked-in values are the documented defaults


def _step_models(config):
    return {s.model_name: s for s in config.ensemble_scheduling.step}


def test_ensemble_steps_reference_existing_models_and_tensors_with_matching_types():
    ens = load(c.ENSEMBLE)
    ens_inputs = {k: v for k, v in tensors(ens.input).items()}
    ens_outputs = tensors(ens.output)
    produced: dict[str, tuple[str, tuple[int, ...]]] = {}  # ensemble tensor -> (type, full dims)
    consumed: set[str] = set()
    for step in ens.ensemble_scheduling.step:
        assert (REPO / step.model_name / "config.pbtxt").is_file(), step.model_name
        assert step.model_version == -1
        model = load(step.model_name)
        inputs, outputs = model_io(model)
        required = {t.name for t in model.input if not t.optional}
        assert required <= set(step.input_map), f"{step.model_name}: required inputs not mapped"
        for model_input, ens_tensor in step.input_map.items():
            assert model_input in inputs, f"{step.model_name} has no input {model_input}"
            source = ens_inputs.get(ens_tensor) or produced.get(ens_tensor)
            assert source is not None, f"{ens_tensor} is used by {step.model_name} before it exists"
            assert source[0] == inputs[model_input][0], f"{ens_tensor}: {source[0]} -> {inputs[model_input][0]}"
            assert len(source[1]) == len(inputs[model_input][1]), f"{ens_tensor}: rank differs"
            for a, b in zip(source[1], inputs[model_input][1]):
                assert a == b or -1 in (a, b), f"{ens_tensor}: dims {source[1]} vs {inputs[model_input][1]}"
            consumed.add(ens_tensor)
        for model_output, ens_tensor in step.output_map.items():
            assert model_output in outputs, f"{step.model_name} has no output {model_output}"
            produced[ens_tensor] = outputs[model_output]
    for name, (dtype, dims) in ens_outputs.items():
        assert name in produced and produced[name][0] == dtype
    assert set(ens_inputs) <= consumed, f"inputs nobody reads: {set(ens_inputs) - consumed}"
    internal = set(produced) - set(ens_outputs)
    assert internal <= consumed, f"intermediate tensors nobody reads: {internal - consumed}"


def test_ensemble_passes_every_input_a_model_declares():
    # A composing model's optional input that the ensemble never maps would silently keep its default.
    steps = _step_models(load(c.ENSEMBLE))
    for name, step in steps.items():
        side_channel = {c.CANCEL_INPUT} if name == c.LLM else set()  # sent to llm directly, never by the ensemble
        assert {t.name for t in load(name).input} - side_channel == set(step.input_map), name
        assert {t.name for t in load(name).output} == set(step.output_map), name


def test_client_package_uses_the_same_names_and_types():
    request = pytest.importorskip("internvl_client.request")
    contract_inputs = {s.name: s.datatype for s in c.ENSEMBLE_INPUTS}
    for name, datatype in request.INPUTS.items():
        assert contract_inputs.get(name) == datatype, name
    assert request.OUTPUTS == {s.name: s.datatype for s in c.OUTPUTS}
    assert set(request.FINISH_REASONS) == set(c.FINISH_REASONS.values())


def test_llm_engine_parameters_parse():
    from internvl_serve.serving.llm_engine import EngineOptions

    params = {k: v.string_value for k, v in load(c.LLM).parameters.items()}
    options = EngineOptions.from_parameters(params)
    assert set(params) - {"device"} <= {f for f in EngineOptions.__dataclass_fields__}
    assert options == EngineOptions()  # the checked-in values are the documented defaults


def test_llm_refuses_more_sequences_than_tokens_per_step():
    """The scheduler never runs more sequences than a step has tokens (each decode takes one before
    another is admitted), so max_num_seqs above max_num_batched_tokens is refused at load, naming both,
    rather than capped in silence."""
    from internvl_serve.serving.llm_engine import EngineOptions

    with pytest.raises(ValueError, match=r"'max_num_batched_tokens' \(512\) must be at least 'max_num_seqs' \(1024\)"):
        EngineOptions.from_parameters({"max_num_seqs": "1024"})
    options = EngineOptions.from_parameters({"max_num_seqs": "1024", "max_num_batched_tokens": "1024"})
    assert (options.max_num_seqs, options.max_num_batched_tokens) == (1024, 1024)


def test_preprocess_warms_every_instance_up_with_requests_it_accepts(tiny_checkpoint):
    """model_warmup: Triton runs these samples on each preprocess instance at load (warmup_samples.py).
    Each names files in warmup/ that hold one serialized string for an input of that name and type, and
    together they make a request the service accepts: one image, one 448 tile, the card's image tokens."""
    import io

    import numpy as np
    from PIL import Image
    from tritonclient.utils import deserialize_bytes_tensor

    from internvl_serve.serving import warmup_samples
    from internvl_serve.serving.parsing import parse_chat_request
    from internvl_serve.serving.preprocess import Preprocessor
    from internvl_serve.tokenizer import IMG_CONTEXT_TOKEN

    config = load(c.PREPROCESS)
    declared = tensors(config.input)
    assert [s.name for s in config.model_warmup] == ["png", "jpeg", "png again"]
    preprocessor = Preprocessor(tiny_checkpoint)
    context_id = preprocessor.tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    for sample in config.model_warmup:
        assert sample.batch_size == 1 and sorted(sample.inputs) == ["images", "text_input"]
        inputs = {}
        for name, spec in sample.inputs.items():
            assert declared[name][0] == type_name(spec.data_type) == "TYPE_STRING" and tuple(spec.dims) == (1,)
            inputs[name] = deserialize_bytes_tensor((warmup_samples.FOLDER / spec.input_data_file).read_bytes())
            assert inputs[name].shape == (1,), (sample.name, name)
        out = preprocessor(parse_chat_request(inputs), output_slot=0)
        assert out.pixel_values.shape == (1, 3, 448, 448), sample.name
        assert int((out.input_ids == context_id).sum()) == preprocessor.config.num_image_token
    # the checked-in files are what warmup_samples.py writes (images compared as pixels: encoders differ)
    files = {name: deserialize_bytes_tensor((warmup_samples.FOLDER / name).read_bytes())[0]
             for name in warmup_samples.samples()}
    assert files["text_input"] == warmup_samples.QUESTION
    for name, ((height, width), fmt) in warmup_samples.IMAGES.items():
        image = Image.open(io.BytesIO(files[name]))
        assert (image.format, image.size) == (fmt, (width, height))
    png = np.asarray(Image.open(io.BytesIO(files["image_png"])))
    assert np.array_equal(png, np.asarray(Image.open(io.BytesIO(warmup_samples.samples()["image_png"]))))
