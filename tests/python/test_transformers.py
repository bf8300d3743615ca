"""msda.patch on Hugging Face transformers models, built from tiny configs with random weights
(nothing is downloaded).

Each model is compared with a deep copy of itself left on transformers' own path, in float64:
every floating-point output, the gradient of every parameter and of the pixels, in train mode
(dropout on; torch is reseeded before each forward, so both paths draw the same masks) and in
eval mode, batch 2, with padding in pixel_mask (and in the text mask where a model has text).

At initialisation Deformable DETR-style models place every encoder sample exactly on a pixel
centre plus whole pixels, where the bilinear form has a kink and grid_sample's one-sided gradient
differs from SPEC's (README, "End-to-end training"); a trained model has no such alignment. So
the sampling_offsets parameters are jittered first: the comparison is then of the same smooth
function, and the gradients must agree to rounding (relative 1e-9 in float64; they agree to about
1e-13). The convolutions get He initialisation (see build()). Every model has dropout on in train
mode (0.1), and the kernel calls are counted, so that a patched model that silently ran
transformers' path would fail.

RT-DETRv2, D-FINE and DEIMv2 run the v2 attention (transformers' multi_scale_deformable_attention_v2:
points per level, here [3, 3, 3], [3, 6, 3] and [1, 4, 2], bilinear or discrete sampling). With
discrete sampling the pixel choice has no gradient: the sampling_offsets parameters get None on
transformers' path, and must get None (not zeros) on msda's too.
"""
import contextlib
import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import msda  # noqa: E402
from conftest import make_problem  # noqa: E402
from msda.integrations import transformers as integration  # noqa: E402

F64 = torch.float64
_RESNET = dict(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic")
_SWIN = dict(image_size=64, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4)


def _pixels(n=2, h=64, w=80, seed=0):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _pixel_mask(n=2, h=64, w=80):
    """Image 1 is padded on the right and at the bottom, image 0 not at all."""
    mask = torch.ones(n, h, w, dtype=torch.long)
    mask[1, :, w - 24:] = 0
    mask[1, h - 16:, :] = 0
    return mask


# Model builders: (model, inputs, number of deformable attention layers).
def deformable_detr(two_stage=False, with_box_refine=False):
    config = transformers.DeformableDetrConfig(
        backbone_config=transformers.ResNetConfig(**_RESNET, out_features=["stage2", "stage3", "stage4"]),
        use_pretrained_backbone=False, d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10,
        two_stage_num_proposals=10, num_labels=3, two_stage=two_stage, with_box_refine=with_box_refine)
    model = transformers.DeformableDetrForObjectDetection(config)
    return model, dict(pixel_values=_pixels(), pixel_mask=_pixel_mask()), 1 + 2


# RT-DETR and its successors (RT-DETRv2, D-FINE, DEIMv2): a tiny ResNet backbone and hybrid encoder.
_RT_DETR_FAMILY = dict(
    encoder_in_channels=[16, 32, 64], d_model=32, encoder_hidden_dim=32, decoder_in_channels=[32, 32, 32],
    encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
    decoder_layers=2, num_queries=10, num_labels=3, num_denoising=0, dropout=0.1)


def _rt_detr_family(config_class, model_class, **kwargs):
    config = config_class(
        backbone_config=transformers.RTDetrResNetConfig(**_RESNET, out_features=["stage2", "stage3", "stage4"]),
        **_RT_DETR_FAMILY, **kwargs)
    model = model_class(config)
    # RT-DETR upsamples its feature maps by 2 and concatenates: sides are multiples of 32.
    return model, dict(pixel_values=_pixels(w=96), pixel_mask=_pixel_mask(w=96)), 2


def rt_detr():
    return _rt_detr_family(transformers.RTDetrConfig, transformers.RTDetrForObjectDetection)


# The v2 attention (multi_scale_deformable_attention_v2): RT-DETRv2 with equal points per level,
# bilinear ("default") or discrete sampling; D-FINE and DEIMv2 with unequal points per level.
def rt_detr_v2(method="default"):
    return _rt_detr_family(transformers.RTDetrV2Config, transformers.RTDetrV2ForObjectDetection, decoder_n_points=3,
                           decoder_method=method)


def d_fine():
    return _rt_detr_family(transformers.DFineConfig, transformers.DFineForObjectDetection,
                           decoder_n_points=[3, 6, 3], lqe_hidden_dim=8)


def deimv2():
    return _rt_detr_family(transformers.Deimv2Config, transformers.Deimv2ForObjectDetection,
                           decoder_n_points=[1, 4, 2], lqe_hidden_dim=8, decoder_method="discrete")


def grounding_dino():
    text = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=64)
    config = transformers.GroundingDinoConfig(
        backbone_config=transformers.ResNetConfig(**_RESNET, out_features=["stage2", "stage3", "stage4"]),
        text_config=text, d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, max_text_len=16)
    model = transformers.GroundingDinoForObjectDetection(config)
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    text_mask = torch.ones_like(ids)
    text_mask[1, 5:] = 0
    inputs = dict(pixel_values=_pixels(), pixel_mask=_pixel_mask(), input_ids=ids, attention_mask=text_mask)
    return model, inputs, 1 + 2


def omdet_turbo():
    # OmDet-Turbo's layer norms after the backbone expect timm's channels-last Swin output, so they
    # are off for transformers' own backbone; its task features have the text width, which must
    # therefore equal class_embed_dim, and differ from the decoder width (transformers 5.24 only
    # creates task_project then, yet always calls it).
    text = transformers.CLIPTextConfig(vocab_size=100, hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, max_position_embeddings=16, bos_token_id=98,
                                       eos_token_id=99)
    config = transformers.OmDetTurboConfig(
        backbone_config=transformers.ResNetConfig(**_RESNET, out_features=["stage2", "stage3", "stage4"]),
        text_config=text, apply_layernorm_after_vision_backbone=False, encoder_in_channels=[16, 32, 64],
        encoder_hidden_dim=32, vision_features_channels=[32, 32, 32], decoder_hidden_dim=32, decoder_num_heads=2,
        decoder_num_layers=2, decoder_dim_feedforward=32, encoder_dim_feedforward=32, encoder_attention_heads=2,
        num_queries=10, text_projection_in_dim=48, text_projection_out_dim=48, class_embed_dim=48,
        task_encoder_hidden_dim=48, image_size=64, encoder_dropout=0.1, decoder_dropout=0.1)
    model = transformers.OmDetTurboForObjectDetection(config)
    gen = torch.Generator().manual_seed(1)
    inputs = dict(pixel_values=_pixels(h=64, w=64), classes_input_ids=torch.randint(1, 98, (5, 16), generator=gen),
                  classes_attention_mask=torch.ones(5, 16, dtype=torch.long),
                  tasks_input_ids=torch.randint(1, 98, (2, 16), generator=gen),
                  tasks_attention_mask=torch.ones(2, 16, dtype=torch.long), classes_structure=torch.tensor([3, 2]))
    return model, inputs, 2


def mask2former():
    config = transformers.Mask2FormerConfig(
        backbone_config=transformers.SwinConfig(**_SWIN, out_features=["stage1", "stage2", "stage3", "stage4"]),
        feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32, encoder_layers=2,
        decoder_layers=2, num_attention_heads=2, dim_feedforward=32, num_queries=10, num_labels=3, dropout=0.1)
    model = transformers.Mask2FormerForUniversalSegmentation(config)
    return model, dict(pixel_values=_pixels(h=64, w=64), pixel_mask=_pixel_mask(h=64, w=64)), 2


def oneformer():
    config = transformers.OneFormerConfig(
        backbone_config=transformers.SwinConfig(**_SWIN, out_features=["stage1", "stage2", "stage3", "stage4"]),
        conv_dim=32, mask_dim=32, hidden_dim=32, encoder_feedforward_dim=32, encoder_layers=2, decoder_layers=2,
        num_attention_heads=2, dim_feedforward=32, num_queries=10, text_encoder_width=32, text_encoder_num_layers=1,
        task_seq_len=8, text_encoder_context_length=8, text_encoder_vocab_size=100, query_dec_layers=1, num_labels=3)
    model = transformers.OneFormerForUniversalSegmentation(config)
    tasks = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    return model, dict(pixel_values=_pixels(h=64, w=64), pixel_mask=_pixel_mask(h=64, w=64), task_inputs=tasks), 2


BUILDERS = {
    "deformable_detr": deformable_detr,
    "deformable_detr_box_refine": lambda: deformable_detr(with_box_refine=True),
    "deformable_detr_two_stage": lambda: deformable_detr(two_stage=True, with_box_refine=True),
    "rt_detr": rt_detr,
    "rt_detr_v2": rt_detr_v2,
    "rt_detr_v2_discrete": lambda: rt_detr_v2("discrete"),
    "d_fine": d_fine,
    "deimv2_discrete": deimv2,
    "grounding_dino": grounding_dino,
    "omdet_turbo": omdet_turbo,
    "mask2former": mask2former,
    "oneformer": oneformer,
}


def build(name, dtype=F64, seed=0):
    torch.manual_seed(seed)
    model, inputs, layers = BUILDERS[name]()
    model = model.to(dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if "sampling_offsets" in name_:
                p.add_((torch.rand(p.shape, generator=gen, dtype=F64) * 0.6 - 0.3).to(p.dtype))
        # transformers initialises RT-DETR's convolutions and batch norms with std 0.01, which
        # leaves the decoder's attention values near 1e-10, too small to show a wrong kernel in
        # the outputs: He initialisation and unit norms keep every model's activations of order one.
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, generator=gen)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
    return model, inputs, layers


@contextlib.contextmanager
def count_msda_calls():
    """Counts the calls that reach msda's op through the integration."""
    calls = [0]
    original = integration.ms_deform_attn

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    integration.ms_deform_attn = counting
    try:
        yield calls
    finally:
        integration.ms_deform_attn = original


def _float_tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _float_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _float_tensors(v)]
    return []


def _clear_caches(model):
    # OmDet-Turbo caches text embeddings, graph included, across calls: each run starts afresh.
    for module in model.modules():
        for attr in ("language_cache_class", "language_cache_prompt"):
            cache = getattr(module, attr, None)
            if cache is not None:
                setattr(module, attr, type(cache)(cache.capacity))


def run(model, inputs, train, seed=1):
    """Forward and backward of a fixed random projection of every floating-point output.
    Returns (outputs, pixel gradient, {parameter name: gradient})."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    _clear_caches(model)
    pixels = inputs["pixel_values"].clone().requires_grad_()
    torch.manual_seed(seed)
    outputs = _float_tensors(model(**{**inputs, "pixel_values": pixels}))
    gen = torch.Generator().manual_seed(7)
    loss = 0
    for t in outputs:
        weights = torch.randn(t.shape, generator=gen, dtype=F64).to(t.dtype)
        # Not the infinities of masked logits, nor OmDet-Turbo's finfo.max for invalid anchors.
        typical = torch.isfinite(t) & (t.abs() < 1e30)
        loss = loss + (torch.where(typical, t, torch.zeros_like(t)) * weights).sum()
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return [t.detach() for t in outputs], pixels.grad, grads


def assert_same(expected, actual, rtol=1e-9):
    outs_e, pix_e, grads_e = expected
    outs_a, pix_a, grads_a = actual
    assert len(outs_e) == len(outs_a)
    for i, (e, a) in enumerate(zip(outs_e, outs_a)):
        # OmDet-Turbo fills invalid anchors with finfo.max: such sentinels set no scale.
        typical = e[torch.isfinite(e) & (e.abs() < 1e30)]
        scale = typical.abs().max().item() if typical.numel() else 1.0
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale, equal_nan=True, msg=lambda m: f"output {i}: {m}")
    assert pix_e is not None and pix_e.abs().max() > 0, "the pixels get no gradient: the check would be empty"
    torch.testing.assert_close(pix_a, pix_e, rtol=rtol, atol=rtol * pix_e.abs().max().item(),
                               msg=lambda m: f"pixel gradient: {m}")
    assert [k for k, g in grads_e.items() if g is None] == [k for k, g in grads_a.items() if g is None]
    present = {k: g for k, g in grads_e.items() if g is not None}
    # Gradients that are mathematically zero (a key bias before a softmax, a bias before a norm)
    # come out as rounding noise of either sign: each tensor is compared relative to its own
    # largest entry, but never to less than the median of those over all parameters.
    largest = torch.tensor([g.abs().max().item() for g in present.values()], dtype=F64)
    floor = largest.median().item()
    assert floor > 0
    for k, e in present.items():
        scale = max(e.abs().max().item(), floor)
        torch.testing.assert_close(grads_a[k], e, rtol=rtol, atol=rtol * scale, msg=lambda m: f"grad of {k}: {m}")


@pytest.mark.parametrize("name", list(BUILDERS))
def test_patched_model_equals_transformers(name):
    model, inputs, layers = build(name)
    reference = copy.deepcopy(model)
    assert msda.patch(model) == layers
    assert msda.patch(model) == 0
    # Every layer's hidden states and attention weights join the outputs compared.
    inputs = {**inputs, "output_attentions": True, "output_hidden_states": True}
    for train in (True, False):
        with count_msda_calls() as calls:
            expected = run(reference, inputs, train)
        assert calls[0] == 0, "the unpatched copy reached msda"
        with count_msda_calls() as calls:
            actual = run(model, inputs, train)
        assert calls[0] == layers, f"{calls[0]} calls to msda in one forward, expected one per layer ({layers})"
        assert_same(expected, actual)
        # Discrete sampling: the offsets get no gradient (None, what AdamW's weight decay skips),
        # not zeros; bilinear sampling: they do get one.
        offsets = {k: g for k, g in actual[2].items() if "sampling_offsets" in k}
        assert all((g is None) == name.endswith("_discrete") for g in offsets.values()), name


def test_state_dict_and_modes_unchanged():
    for name in ("deformable_detr", "mask2former", "rt_detr_v2", "d_fine", "deimv2_discrete"):
        model, _, _ = build(name, dtype=torch.float32)
        model.eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        msda.patch(model)
        after = model.state_dict()
        assert list(after) == list(before)
        for k in before:
            assert torch.equal(after[k], before[k]), k
        assert not any(m.training for m in model.modules())
        # A checkpoint of the unpatched model loads strictly into the patched one.
        fresh, _, _ = build(name, dtype=torch.float32, seed=3)
        model.load_state_dict(fresh.state_dict(), strict=True)


def test_no_global_change_and_deepcopy():
    """Patching one Mask2Former leaves transformers' module and other instances alone; a deep copy
    of a patched model stays patched."""
    module = sys.modules[type(build("mask2former")[0]).__module__]
    function = module.multi_scale_deformable_attention
    patched, inputs, layers = build("mask2former", dtype=torch.float32)
    other, _, _ = build("mask2former", dtype=torch.float32)
    msda.patch(patched)
    assert module.multi_scale_deformable_attention is function
    assert not any("forward" in m.__dict__ for m in other.modules())
    twin = copy.deepcopy(patched)
    assert msda.patch(twin) == 0
    with torch.no_grad(), count_msda_calls() as calls:
        other.eval()(**inputs)
        assert calls[0] == 0
        twin.eval()(**inputs)
        assert calls[0] == layers
    assert msda.patch(other) == layers


def test_compiled_deformable_detr_equals_eager():
    model, inputs, layers = build("deformable_detr", dtype=torch.float32)
    model.eval()
    msda.patch(model)
    from torch._inductor.compile_fx import compile_fx

    graphs = []

    def inductor_recording(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    with torch.no_grad():
        eager = _float_tensors(model(**inputs))
        compiled = _float_tensors(torch.compile(model, backend=inductor_recording)(**inputs))
    torch._dynamo.reset()
    ops = [n for g in graphs for n in g.graph.nodes if "msda.ms_deform_attn" in str(n.target)]
    assert len(ops) == layers, f"{len(ops)} msda ops in the compiled graphs, expected {layers} (graph breaks?)"
    assert len(eager) == len(compiled)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)


def test_compiled_mask2former_traces_msda():
    """The rebound forward of Mask2Former's attention (its own code with msda's kernel) traces."""
    model, inputs, layers = build("mask2former", dtype=torch.float32)
    model.eval()
    msda.patch(model)
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        eager = _float_tensors(model(**inputs))
        compiled = _float_tensors(torch.compile(model, backend=recording)(**inputs))
    torch._dynamo.reset()
    ops = [n for g in graphs for n in g.graph.nodes if "msda.ms_deform_attn" in str(n.target)]
    assert len(ops) == layers
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)


def test_any_module_containing_the_attention():
    model, _, _ = build("deformable_detr", dtype=torch.float32)
    attention = model.model.encoder.layers[0].self_attn
    container = nn.ModuleDict({"backbone": nn.Linear(2, 2), "attention": attention})
    assert msda.patch(container) == 1
    assert isinstance(attention.attn, integration.MSDAMultiScaleDeformableAttention)
    with pytest.raises(ValueError, match="MultiScaleDeformableAttention itself"):
        msda.patch(model.model.decoder.layers[0].encoder_attn.attn)


def test_model_without_msda_raises():
    resnet = transformers.ResNetModel(transformers.ResNetConfig(**_RESNET))
    for model, name in ((resnet, "ResNetModel"), (nn.Sequential(nn.Linear(2, 2)), "Sequential")):
        with pytest.raises(ValueError, match=f"no multi-scale deformable attention that msda knows in {name}") as e:
            msda.patch(model)
        assert "MultiScaleDeformableAttention" in str(e.value) and "Mask2Former" in str(e.value)
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        msda.patch("DeformableDetrForObjectDetection")


@pytest.mark.parametrize("name", ["rt_detr_v2", "d_fine"])
def test_v2_patch_is_local(name):
    """The v2 attention is patched per instance: RT-DETRv2's attention gets a rebound forward, D-FINE's
    (and DEIMv2's) its ms_deformable_attn_core attribute set to msda's; transformers' module
    function and every other instance keep transformers' function; a deep copy of a patched model
    stays patched."""
    patched, inputs, layers = build(name, dtype=torch.float32)
    module = sys.modules[type(patched).__module__]
    function = module.multi_scale_deformable_attention_v2
    other, _, _ = build(name, dtype=torch.float32)
    assert msda.patch(patched) == layers
    assert module.multi_scale_deformable_attention_v2 is function
    swapped = [m for m in patched.modules()
               if "forward" in m.__dict__ or m.__dict__.get("ms_deformable_attn_core", function) is not function]
    assert len(swapped) == layers
    for m in other.modules():
        assert "forward" not in m.__dict__
        assert m.__dict__.get("ms_deformable_attn_core", function) is function
    twin = copy.deepcopy(patched)
    assert msda.patch(twin) == 0
    with torch.no_grad(), count_msda_calls() as calls:
        other.eval()(**inputs)
        assert calls[0] == 0
        twin.eval()(**inputs)
        assert calls[0] == layers
    assert msda.patch(other) == layers


def test_old_transformers_is_refused(monkeypatch):
    model, _, _ = build("deformable_detr", dtype=torch.float32)
    # transformers may swap the module object in sys.modules after its first model build: patch the
    # one that an import finds now.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.49.0")
    with pytest.raises(ImportError, match=r"transformers 4\.49\.0 is installed.*>= 4\.50\.0"):
        msda.patch(model)
    assert not any(isinstance(m, integration.MSDAMultiScaleDeformableAttention) for m in model.modules())


def test_import_msda_does_not_import_transformers():
    code = "import sys, msda; assert 'transformers' not in sys.modules, 'import msda imported transformers'"
    subprocess.run([sys.executable, "-c", code], check=True)


KERNEL_MODULES = ["deformable_detr", "rt_detr", "grounding_dino", "mm_grounding_dino", "omdet_turbo", "lw_detr",
                  "rf_detr", "pp_doclayout_v2", "pp_doclayout_v3", "pp_doclayout_v4"]


@pytest.mark.parametrize("model_type", KERNEL_MODULES)
def test_replacement_takes_the_kernels_arguments(model_type):
    """msda's module is a drop-in for every model family's kernel: same forward parameters, in order.
    (The models above the kernel are tested end to end only for some families; the others call
    their kernel the same way, positionally, with the same seven arguments.)"""
    import importlib
    import inspect

    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    kernel = modeling.MultiScaleDeformableAttention
    theirs = list(inspect.signature(kernel.forward).parameters)
    ours = list(inspect.signature(integration.MSDAMultiScaleDeformableAttention.forward).parameters)
    assert ours == theirs
    holder = nn.Module()
    holder.attn = kernel()
    assert msda.patch(holder) == 1 and isinstance(holder.attn, integration.MSDAMultiScaleDeformableAttention)
    # And it computes what that family's kernel computes.
    prob = make_problem(n=2, q=6, m=2, d=4, shapes=((5, 7), (3, 4), (2, 2)), p=3, seed=4)
    args = (prob["value"], prob["spatial_shapes"], [tuple(hw) for hw in prob["spatial_shapes"].tolist()],
            prob["level_start_index"], prob["sampling_locations"], prob["attention_weights"], 64)
    torch.testing.assert_close(holder.attn(*args), kernel()(*args), rtol=1e-12, atol=1e-12)
