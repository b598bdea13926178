"""README's "Use with" snippets, run as they stand (the distributed ones are run by
tests/test_distributed.py), and what each must have done."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from readme_snippets import run_snippet, snippet
from triton_adadelta import Adadelta

needs = lambda module: pytest.mark.skipif(  # noqa: E731
    importlib.util.find_spec(module) is None, reason=f"{module} is not installed (pip install -e '.[test]')"
)


def _assert_stepped(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: int) -> None:
    assert isinstance(optimizer, Adadelta)
    assert len(optimizer.state) == len(params)
    for param in params:
        state = optimizer.state[param]
        assert float(state["step"]) == steps
        assert state["square_avg"].abs().sum() > 0 and torch.isfinite(param).all()


def test_every_snippet_is_there() -> None:
    for name in ("ddp", "zero", "fsdp2", "compile", "hf", "lightning", "lightning-resume"):
        assert "from triton_adadelta import Adadelta" in snippet(name)


def test_the_torch_compile_snippet(cpu_path) -> None:
    torch._dynamo.reset()
    namespace = run_snippet("compile")
    model = namespace["model"]
    _assert_stepped(namespace["optimizer"], list(model.parameters()), 3)


@needs("transformers")
def test_the_hugging_face_trainer_snippet(cpu_path) -> None:
    namespace = run_snippet("hf")
    trainer, model = namespace["trainer"], namespace["model"]
    assert trainer.state.global_step == 4
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # (accelerate's wrapper)
    _assert_stepped(optimizer, [p for p in model.parameters() if p.requires_grad], 4)


@needs("transformers")
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.uint8])
def test_a_hugging_face_run_resumed_from_its_checkpoint_ends_as_the_uninterrupted_one(
    cpu_path, tmp_path: Path, state_dtype: torch.dtype
) -> None:
    # 8-bit state's rounding seeds are in the optimizer's param groups, which the
    # Trainer's checkpoint keeps, so the run goes on bit for bit.
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    initial = GPT2LMHeadModel(config)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (32, 16))]

    def trainer_for(model: torch.nn.Module, out: Path) -> Trainer:
        args = TrainingArguments(str(out), max_steps=4, per_device_train_batch_size=8, save_steps=2, report_to=[])
        optimizer = Adadelta(model.parameters(), lr=1.0, state_dtype=state_dtype)
        return Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))

    uninterrupted = copy.deepcopy(initial)
    trainer_for(uninterrupted, tmp_path / "a").train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "optimizer.pt").exists()

    resumed = copy.deepcopy(initial)
    trainer_for(resumed, tmp_path / "b").train(resume_from_checkpoint=str(checkpoint))
    for a, b in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@needs("lightning")
def test_the_lightning_snippet(cpu_path) -> None:
    namespace = run_snippet("lightning")
    trainer = namespace["trainer"]
    assert trainer.global_step == 4
    (optimizer,) = trainer.optimizers
    _assert_stepped(optimizer, list(trainer.lightning_module.parameters()), 4)


@needs("lightning")
def test_the_lightning_resume_snippet_ends_as_the_uninterrupted_run(cpu_path, tmp_path: Path, monkeypatch) -> None:
    # README's recipe, as it stands (8-bit state; Lightning keeps no RNG state, and the
    # resume runs after other draws from torch's generator), then the same four epochs
    # without a stop, from the same start: the same bits.
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = run_snippet("lightning-resume")
    resumed = namespace["trainer"]
    assert resumed.current_epoch == 4
    (optimizer,) = resumed.optimizers
    assert isinstance(optimizer, Adadelta) and optimizer.param_groups[0]["state_dtype"] == torch.uint8

    import lightning

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 16), torch.randn(32, 4)), batch_size=8)
    module = namespace["Regression"]()
    lightning.Trainer(max_epochs=4, enable_checkpointing=False, **namespace["options"]).fit(module, data)
    for a, b in zip(module.parameters(), resumed.lightning_module.parameters()):
        assert torch.equal(a, b)
