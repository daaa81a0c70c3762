"""A GGUF file as model_name_or_path: dequantized weights, tokenizer and chat template from the file, the
FSDP skeleton from its config, clear refusals, the HF-directory export, and an adapter trained on a GGUF
base reused afterwards. All on a tiny GGUF written by the ``gguf`` package (tests/common/tiny_gguf.py)."""

import json
import shutil
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from callbacks.edit_report import EditReport
from data.base import round_protocol
from data.counterfact import CounterFactDataModule
from lit_common import gguf_source
from lit_common.gguf_source import GGUFSourceError, export_hf_directory
from lit_common.sources import empty_causal_lm, load_causal_lm, load_tokenizer
from lit_corsa.module import EditModule
from lit_corsa.settings import EvaluationSettings, LoraSettings, OptimizerSettings
from tests.common.tiny_gguf import CHAT_TEMPLATE, write_tiny_gguf

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[3, 50, 70, 90, 261, 262, 5]])


def test_weights_are_the_files_dequantized_values(tiny_gguf):
    path, reference = tiny_gguf
    model = load_causal_lm(str(path))
    assert model.dtype == torch.float32 and not model.is_quantized
    assert getattr(model.config, "quantization_config", None) is None  # a plain model: trainable, serializable
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=0, atol=0)
    assert model.name_or_path == str(path)  # the file, which an adapter then records as its base


def test_dtype_and_directory_source(tiny_gguf, tmp_path):
    path, reference = tiny_gguf
    shutil.copy(path, tmp_path / path.name)
    model = load_causal_lm(str(tmp_path), "bfloat16")  # a directory holding one .gguf and no config.json
    assert model.dtype == torch.bfloat16
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight,
                               reference.model.layers[0].mlp.down_proj.weight.bfloat16(), rtol=0, atol=0)
    shutil.copy(path, tmp_path / "other.gguf")
    with pytest.raises(GGUFSourceError, match=rf"{tmp_path} holds 2 .gguf files and no config.json.*other.gguf, tiny.gguf"):
        load_causal_lm(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert gguf_source.gguf_file(tmp_path) is None  # a Hugging Face directory, whatever else it holds


def test_tokenizer_and_chat_template_come_from_the_file(tiny_gguf):
    path, _ = tiny_gguf
    tokenizer = load_tokenizer(str(path))
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "the Eiffel Tower"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nthe Eiffel Tower<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text).input_ids
    assert ids[0] == 1 and ids.count(2) == 1  # special tokens stay whole
    assert tokenizer.decode(tokenizer(" the Rome").input_ids) == " the Rome"


def test_empty_model_for_fsdp_ranks_matches_the_loaded_one(tiny_gguf):
    path, _ = tiny_gguf
    loaded, empty = load_causal_lm(str(path), "bfloat16"), empty_causal_lm(str(path), "bfloat16")
    assert {p.device.type for p in empty.parameters()} == {"meta"}
    assert [(n, t.shape, t.dtype) for n, t in empty.state_dict().items()] == \
           [(n, t.shape, t.dtype) for n, t in loaded.state_dict().items()]
    assert empty.config.to_diff_dict() == loaded.config.to_diff_dict()
    assert empty.generation_config == loaded.generation_config
    assert empty.name_or_path == loaded.name_or_path == str(path)


def test_refusals_name_the_file_and_what_is_supported(tmp_path, tiny_gguf):
    write_tiny_gguf(tmp_path / "rwkv.gguf", architecture="rwkv6")
    for load in (load_causal_lm, empty_causal_lm, load_tokenizer):
        with pytest.raises(GGUFSourceError, match=rf"cannot load {tmp_path}/rwkv.gguf \(GGUF architecture 'rwkv6'\)"
                                                  r".*architectures it reads: .*\bllama\b.*\bqwen2\b"):
            load(str(tmp_path / "rwkv.gguf"))
    (tmp_path / "text.gguf").write_text("not a GGUF")
    with pytest.raises(GGUFSourceError, match=rf"{tmp_path}/text.gguf is not a readable GGUF file"):
        load_causal_lm(str(tmp_path / "text.gguf"))
    with pytest.raises(FileNotFoundError, match=rf"GGUF model {tmp_path}/missing.gguf does not exist"):
        load_causal_lm(str(tmp_path / "missing.gguf"))
    path, _ = tiny_gguf
    with pytest.raises(ValueError, match=r"load_in_4bit cannot load the GGUF .*tiny.gguf.*python -m lit_common.gguf_source"):
        load_causal_lm(str(path), load_in_4bit=True)


def test_export_writes_a_plain_hugging_face_directory(tiny_gguf, tmp_path, capsys):
    path, reference = tiny_gguf
    gguf_source.main([str(path), str(tmp_path / "hf")])
    assert "dequantized" in capsys.readouterr().out
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # no GGUF, no project code
    torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template == CHAT_TEMPLATE
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no partial folder left behind
    with pytest.raises(FileExistsError, match=r"hf already exists"):
        export_hf_directory(path, tmp_path / "hf", torch.float32)


def test_an_interrupted_export_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("transformers.PreTrainedTokenizerBase.save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_hf_directory(path, tmp_path / "hf", torch.float32)
    assert list(tmp_path.iterdir()) == []


def _counterfact_records() -> list[dict]:
    rewrite = [("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Rome", " Paris"),
               ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", " English", " French")]
    return [{"case_id": i, "requested_rewrite": {"prompt": prompt.replace(subject, "{}"), "subject": subject,
                                                 "target_new": {"str": new}, "target_true": {"str": true}},
             "paraphrase_prompts": [f"In short: {prompt}"], "neighborhood_prompts": [f"Near it, {prompt.lower()}"]}
            for i, (prompt, subject, new, true) in enumerate(rewrite)]


def test_an_adapter_trained_on_a_gguf_base_is_reused_from_the_file(tiny_gguf, tmp_path):
    """EditReport's adapter records the GGUF as its base; loading that base the documented way
    (``load_causal_lm(base_model_name_or_path, dtype)``) and the adapter reproduces the edited model;
    ``merge_adapter`` writes a plain HF model that does too."""
    path, _ = tiny_gguf
    (tmp_path / "cf.json").write_text(json.dumps(_counterfact_records()))
    L.seed_everything(0, verbose=False)
    data = CounterFactDataModule(source=str(tmp_path / "cf.json"), tokenizer=str(path), num_updates=1,
                                 edits_per_update=2, batch_size=1)
    module = EditModule(model_name_or_path=str(path), method="corsa", lora=LoraSettings(r=4, alpha=8),
                        optimizer=OptimizerSettings(learning_rate=1e-2, warmup_steps=1),
                        evaluation=EvaluationSettings(max_new_tokens=2))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, **round_protocol(1, 1),
                        callbacks=[EditReport(output_dir=str(tmp_path / "run"), merge_adapter=True, plot=False)])
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    adapter = tmp_path / "run" / "adapter"
    base_name = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_name == str(path)
    edited = module.model.eval()(IDS).logits
    reloaded = PeftModel.from_pretrained(load_causal_lm(base_name, "float32"), adapter)
    torch.testing.assert_close(reloaded(IDS).logits, edited, rtol=0, atol=0)
    with module.model.disable_adapter():
        assert not torch.allclose(module.model(IDS).logits, edited)  # the adapter changed something
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged")
    torch.testing.assert_close(merged(IDS).logits, edited, rtol=1e-4, atol=1e-5)


def test_the_tacq_cli_quantizes_a_gguf_model(tiny_gguf, tmp_path):
    """quantize.py with model_name_or_path a .gguf: calibration tokenized by the file's tokenizer,
    gradients and masked GPTQ on the dequantized weights, an export that reloads and generates."""
    import quantize
    from lit_tacq.io import load_quantized, quantized_modules

    path, _ = tiny_gguf
    export = tmp_path / "export"
    quantize.main([
        "fit", "--config", str(ROOT / "configs" / "demo_tacq.yaml"),
        "--model.model_name_or_path", str(path),
        "--data.source", "world:task_qa",
        "--data.token_budget", "400",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks.init_args.export_dir", str(export),
        "--trainer.callbacks.init_args.progress", "false",
    ])
    assert json.loads((export / "report.json").read_text())["quantized"]["answer_nll"] > 0  # evaluated too
    model = load_quantized(export)
    assert len(quantized_modules(model)) == 14
    assert model.generate(IDS, max_new_tokens=3, do_sample=False).shape == (1, IDS.shape[1] + 3)
    assert AutoTokenizer.from_pretrained(export).chat_template == CHAT_TEMPLATE
