"""``--model.kernel fused`` through a task module and the callback: every adapter computes with it, the pattern is
declared final at tfinal (and again on a resume in the final phase), a resume is bitwise, and the settings it cannot
serve are refused before the backbone loads."""

from __future__ import annotations

import pytest
import torch

from adalora_pl import AdaLoRACallback, AdaLoRAConfig, ConfigError, find_adapters
from adalora_pl.io.checkpoint import WEIGHTS_KEY
from adalora_pl.tasks.glue_module import GLUEClassifier
from tests.builders import assert_same_optimizer_state, tiny_bert_classifier, write_cola
from tests.lightning.test_adapter_checkpoints import read
from tests.lightning.test_option_resume import fit_epochs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 4 epochs of 4 steps; the pattern is final from step 16 - 6 = 10, so an epoch-3 checkpoint (step 12) lies after it.
FUSED = dict(kernel="fused", tfinal=6)


@pytest.mark.slow
def test_a_fused_fit_freezes_the_pattern_at_tfinal_and_resumes_bitwise_after_it(tmp_path, tiny_backbone):
    data = write_cola(tmp_path / "CoLA", rows=16)
    whole, whole_trainer, _ = fit_epochs(tmp_path, "whole", tiny_backbone, data, 4, FUSED)
    adapters = whole.adapters
    assert {layer.kernel for layer in adapters.values()} == {"fused"}
    for layer in adapters.values():  # computed on the kept triplets only
        assert torch.equal(layer._kept_index, torch.nonzero(layer.rank_mask).view(-1))
    assert sum(int(layer.rank_mask.sum()) for layer in adapters.values()) == len(adapters)  # target_r 1

    _, first_trainer, ckpt = fit_epochs(tmp_path, "first", tiny_backbone, data, 3, FUSED)
    assert first_trainer.global_step == 12 and read(ckpt)[WEIGHTS_KEY] == "adapters"
    resumed, resumed_trainer, _ = fit_epochs(tmp_path, "resumed", tiny_backbone, data, 4, FUSED, ckpt_path=ckpt)
    assert all(layer._kept_index is not None for layer in resumed.adapters.values())  # declared final on load
    expected, got = whole.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert_same_optimizer_state(whole_trainer, resumed_trainer)


def test_the_callback_sets_the_kernel_on_the_adapters_it_injects_or_adopts():
    from adalora_pl import inject_adapters

    model = tiny_bert_classifier()
    callback = AdaLoRACallback(AdaLoRAConfig(target_modules=["query"], init_r=2, target_r=1, kernel="fused"))
    assert {layer.kernel for layer in callback._inject_or_adopt(_Holder(model)).values()} == {"fused"}

    adopted = tiny_bert_classifier()
    inject_adapters(adopted, ["query"], r=2, lora_alpha=4)
    callback._inject_or_adopt(_Holder(adopted))
    assert {layer.kernel for layer in find_adapters(adopted).values()} == {"fused"}


class _Holder(torch.nn.Module):
    """What the callback's injection sees of a LightningModule: a module holding the backbone."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model


@pytest.mark.parametrize(("settings", "message"), [
    (dict(method="houlsby"), r"kernel='fused' computes LoRA-style adapters .* not method='houlsby'"),
    (dict(quantization="nf4"), r"kernel='fused' covers float base weights; a quantized base \(quantization='nf4'\)"),
])
def test_settings_the_fused_kernel_cannot_serve_are_refused_before_the_backbone_loads(settings, message):
    with pytest.raises(ConfigError, match=message):
        GLUEClassifier(backbone="/nonexistent/backbone", task_name="cola", kernel="fused", **settings)
