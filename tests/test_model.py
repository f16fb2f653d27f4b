import open_clip
import pytest
import torch

from workbench.config import ConfigError
from workbench.model import (PromptLearner, all_text_features, encode_prompt_embeddings, freeze_entire_clip_model,
                             load_clip_with_patch, register_model_configs, resolve_model_name, text_features)


@pytest.fixture(scope="module")
def tiny():
    return load_clip_with_patch("wb-tiny", "cpu", pretrained=None, image_size=(64, 32))


def test_model_names():
    assert resolve_model_name("ViT-B/16") == "ViT-B-16"
    assert resolve_model_name("vitb16") == "ViT-B-16"
    assert resolve_model_name("rn50") == "RN50"
    with pytest.raises(ConfigError, match="model_type"):
        resolve_model_name("ViT-Q/99")
    with pytest.raises(ConfigError, match="pretrained"):
        load_clip_with_patch("wb-tiny", pretrained="no-such-tag", image_size=(64, 32))


def test_prompt_text_path_equals_open_clip_encode_text(tiny):
    import open_clip

    pl = PromptLearner(["a", "b", "c"], tiny, 4, "{aspect} hand of a person", "dorsal right", "wb-tiny")
    assert pl.prompt_text == "A photo of a X X X X dorsal right hand of a person."
    tokens = open_clip.get_tokenizer("wb-tiny")([pl.prompt_text])
    with torch.no_grad():
        reference = tiny.encode_text(tokens, normalize=True)
        ours = encode_prompt_embeddings(tiny, tiny.token_embedding(tokens)[:, :pl.eot_index + 1])
    assert torch.allclose(reference, ours, atol=1e-5)
    feats = all_text_features(tiny, pl)
    assert feats.shape == (3, 128) and torch.allclose(feats.norm(dim=1), torch.ones(3))


def test_gradient_reaches_ctx_only(tiny):
    freeze_entire_clip_model(tiny)
    pl = PromptLearner(["a", "b"], tiny, 3, "{aspect} hand", "left", "wb-tiny")
    assert [n for n, p in pl.named_parameters() if p.requires_grad] == ["ctx"]
    text_features(tiny, pl, torch.tensor([0, 1, 1])).sum().backward()
    assert pl.ctx.grad is not None and pl.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())


def test_impossible_n_ctx_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match="n_ctx"):
        PromptLearner(["a"], tiny, 70, "{aspect} hand of a person with a long description", "dorsal", "wb-tiny")


@pytest.mark.parametrize("name", ["ViT-B/16", "RN50"])
def test_real_architectures_at_256x128_with_a_local_weights_file(name, tmp_path):
    """The real architectures, random weights saved to a file and loaded back as `pretrained`."""
    square = load_clip_with_patch(name, "cpu", pretrained=None, image_size=(224, 224))
    path = tmp_path / "weights.pt"
    torch.save({k: v for k, v in square.state_dict().items() if k not in ("bottleneck", "arcface")}, path)
    model = load_clip_with_patch(name, "cpu", pretrained=str(path), image_size=(256, 128))
    out = model.encode_image(torch.randn(1, 3, 256, 128))
    assert out.shape == (1, model.text_projection.shape[1])
    if name == "RN50":
        assert model.visual.attnpool.positional_embedding.shape[0] == 8 * 4 + 1
        # the class token is kept; the grid is interpolated from the pretrained 7x7
        assert torch.equal(model.visual.attnpool.positional_embedding[0],
                           square.visual.attnpool.positional_embedding[0])


# ----------------------------------------------------------------------------- activation of local weights

OPENAI_ONLY = {"input_resolution": torch.tensor(64), "context_length": torch.tensor(77), "vocab_size": torch.tensor(49408)}


def _module_holding(state_dict):
    """A module whose state_dict() is ``state_dict``: enough for a real TorchScript archive."""
    root = torch.nn.Module()
    for key, value in state_dict.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_buffer(leaf, value)
    return root


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """One set of random wb-tiny weights as an open_clip state dict, an OpenAI-layout state dict
    and an OpenAI TorchScript archive."""
    import warnings

    import open_clip

    register_model_configs()
    torch.manual_seed(0)
    weights = open_clip.create_model("wb-tiny").state_dict()
    folder = tmp_path_factory.mktemp("weights")
    files = {name: folder / f"{name}.pt" for name in ("open_clip", "openai_dict", "openai_jit")}
    torch.save(weights, files["open_clip"])
    torch.save({**weights, **OPENAI_ONLY}, files["openai_dict"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(_module_holding({**weights, **OPENAI_ONLY})).save(str(files["openai_jit"]))
    return files


def _activations(model):
    import open_clip

    acts = [m.mlp.gelu for m in [*model.visual.transformer.resblocks, *model.transformer.resblocks]]
    assert len({type(a) for a in acts}) == 1
    return "QuickGELU" if isinstance(acts[0], open_clip.transformer.QuickGELU) else "GELU"


def _features(model):
    import open_clip

    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 32)
    tokens = open_clip.get_tokenizer("wb-tiny")(["a photo of a hand", "a person"])
    with torch.no_grad():
        return torch.cat([model.encode_image(images), model.encode_text(tokens)])


def _open_clip_reference(path, quick_gelu):
    import open_clip

    model = open_clip.create_model("wb-tiny", pretrained=str(path), force_quick_gelu=quick_gelu,
                                   force_image_size=(64, 32))
    return _features(model.eval())


@pytest.mark.parametrize("kind", ["openai_dict", "openai_jit"])
def test_openai_weights_load_as_quick_gelu(kind, tiny_files):
    lines = []
    model = load_clip_with_patch("wb-tiny", pretrained=str(tiny_files[kind]), image_size=(64, 32), log=lines.append)
    assert _activations(model) == "QuickGELU"
    ours = _features(model.eval())
    assert torch.allclose(ours, _open_clip_reference(tiny_files["open_clip"], quick_gelu=True), atol=1e-5)
    assert not torch.allclose(ours, _open_clip_reference(tiny_files["open_clip"], quick_gelu=False), atol=1e-3)
    reason = "TorchScript archive" if kind == "openai_jit" else "OpenAI's layout"
    assert any(line.startswith("activation: QuickGELU (") and reason in line for line in lines), lines


def test_open_clip_state_dict_is_gelu_unless_the_key_says_otherwise(tiny_files):
    lines = []
    gelu = load_clip_with_patch("wb-tiny", pretrained=str(tiny_files["open_clip"]), image_size=(64, 32),
                                log=lines.append)
    assert _activations(gelu) == "GELU"
    assert torch.allclose(_features(gelu.eval()), _open_clip_reference(tiny_files["open_clip"], False), atol=1e-5)
    assert [line for line in lines if line.startswith("activation:")] == [
        "activation: GELU (model name wb-tiny has no OpenAI weights)"]
    lines.clear()
    quick = load_clip_with_patch("wb-tiny", pretrained=str(tiny_files["open_clip"]), image_size=(64, 32),
                                 quick_gelu=True, log=lines.append)
    assert _activations(quick) == "QuickGELU"
    assert "activation: QuickGELU (quick_gelu key)" in lines


def test_forcing_gelu_on_openai_weights_warns(tiny_files):
    lines = []
    model = load_clip_with_patch("wb-tiny", pretrained=str(tiny_files["openai_jit"]), image_size=(64, 32),
                                 quick_gelu=False, log=lines.append)
    assert _activations(model) == "GELU"
    assert any("warning" in line and "QuickGELU" in line for line in lines), lines


def test_resolve_weights_defaults_by_model_name_and_tag():
    from workbench.model import resolve_weights

    weights, quick, reason = resolve_weights("ViT-B-16", None)
    assert (weights, quick) == (None, False)
    assert resolve_weights("RN50-quickgelu", None)[1] is True
    assert resolve_weights("ViT-B-16", "openai")[:2] == ("openai", True)
    weights, quick, reason = resolve_weights("ViT-B-16", "laion2b_s34b_b88k")
    assert (weights, quick, reason) == ("laion2b_s34b_b88k", False, "open_clip tag laion2b_s34b_b88k")
    assert resolve_weights("ViT-B-16", "laion2b_s34b_b88k", quick_gelu=True)[1:] == (True, "quick_gelu key")


def test_open_clip_state_dict_default_follows_the_model_name(tmp_path):
    """A ViT-B-16 (OpenAI-named) state dict without the OpenAI keys defaults to QuickGELU."""
    from workbench.model import resolve_weights

    path = tmp_path / "w.pt"
    torch.save({"module.logit_scale": torch.tensor(1.0)}, path)
    weights, quick, reason = resolve_weights("ViT-B-16", str(path))
    assert list(weights) == ["logit_scale"] and quick is True
    assert "OpenAI architecture" in reason and "quick_gelu: false" in reason
    weights, quick, reason = resolve_weights("ViT-B-16", str(path), quick_gelu=False)
    assert quick is False and reason == "quick_gelu key"
    torch.save({"state_dict": {"logit_scale": torch.tensor(1.0)}}, path)
    assert resolve_weights("wb-tiny", str(path))[:2] == ({"logit_scale": torch.tensor(1.0)}, False)


def test_bad_weights_files_are_model_errors(tmp_path, tiny_files):
    from workbench.model import ModelError

    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(ModelError, match="cannot load"):
        load_clip_with_patch("wb-tiny", pretrained=str(path), image_size=(64, 32))
    with pytest.raises(ModelError, match="cannot load"):
        load_clip_with_patch("wb-tiny-rn", pretrained=str(tiny_files["openai_jit"]), image_size=(64, 32))


def test_a_file_that_is_no_weights_file_says_so_without_torch_advice(tmp_path):
    from workbench.model import ModelError

    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(ModelError, match="not a PyTorch state dict, TorchScript archive or safetensors file") as err:
        load_clip_with_patch("wb-tiny", pretrained=str(junk), image_size=(64, 32))
    assert "weights_only" not in str(err.value)


def test_a_weights_file_loads_without_the_random_init_warning(tmp_path, caplog):
    import logging

    path = tmp_path / "w.pt"
    torch.save(load_clip_with_patch("wb-tiny", pretrained=None, image_size=(64, 32)).state_dict(), path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_clip_with_patch("wb-tiny", pretrained=str(path), image_size=(64, 32))
        load_clip_with_patch("wb-tiny", pretrained=None, image_size=(64, 32))  # random weights, as the log says
    assert not [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.slow),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="needs CUDA")])])
def test_compiled_encoders_compute_what_eager_ones_do(device):
    """compile: true changes speed, not numbers (forward and gradients), nor checkpoint names."""
    import copy

    from workbench.model import compile_encoders, encode_images, encode_prompt_embeddings

    torch.manual_seed(0)
    eager = load_clip_with_patch("wb-tiny", device, pretrained=None, image_size=(64, 32), freeze_all=False)
    compiled = copy.deepcopy(eager)
    compile_encoders(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    images = torch.randn(4, 3, 64, 32, device=device)
    tokens = open_clip.get_tokenizer("wb-tiny")(["A photo of a dorsal right hand."]).to(device)
    embedded = eager.token_embedding(tokens)[:, :int(tokens.argmax(-1)) + 1].detach()
    for model in (eager, compiled):
        loss = encode_images(model, images).pow(2).mean() + encode_prompt_embeddings(model, embedded).sum()
        loss.backward()
    assert torch.allclose(encode_images(compiled, images), encode_images(eager, images), atol=1e-4)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-4, rtol=1e-3), name


def test_optimizer_state_from_another_device_keeps_this_devices_implementation():
    from workbench.stages import adam, match_device

    weights = torch.nn.Parameter(torch.ones(3))
    optimizer = adam([weights], torch.device("cpu"), lr=0.1)
    saved = optimizer.state_dict()
    saved["param_groups"][0]["fused"] = True  # as a CUDA run writes it
    optimizer.load_state_dict(saved)
    match_device(optimizer, torch.device("cpu"))
    weights.sum().backward()
    optimizer.step()
    assert optimizer.param_groups[0]["fused"] is None and weights[0].item() == pytest.approx(0.9)
