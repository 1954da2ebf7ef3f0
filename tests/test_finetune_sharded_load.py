"""`dsmoe finetune` under torchrun builds the model on the meta device, shards it, and each rank reads only its own
slices of BASE (dsmoe.checkpoint.hf.HubWeights.fill) and draws the head and LoRA factors as one process does,
keeping its slices. On 2 CPU ranks (gloo): every parameter, gathered, equals bit for bit the one-process whole load
(FSDP2 with a LoRA classifier, expert parallelism with LoRA on attention, dense MLPs and experts, a full
classifier with EP, an FP8 base whose 12 x 20 scale blocks straddle the ranks' row chunks, a new MTP module with
EP; and on 4 ranks EP 2 x FSDP 2 over the experts, whole experts per rank and, with 3 experts per EP rank, each
expert's rows split); a short fine-tune gives the losses and gradient norms of the
same ranks loading BASE whole, exactly; each rank reads half of the checkpoint's bytes and holds half of the model.

Two distributed runs (a module fixture) do every job; the tests read what they left behind."""

import argparse
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsmoe.distributed.testing import run_distributed

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = ["--seq-len", "48", "--micro-batch", "1", "--no-progress", "--warmup-steps", "1", "--log-interval", "1",
        "--eval-interval", "100", "--dist-timeout", "60"]
BLOCK = [12, 20]  # FP8 scale blocks that neither the rows nor the ranks' row chunks divide
TRAINED = ("fsdp_lora_classify", "ep_lora_sft")


def jobs(model_dir, fp8_dir, chats, spam) -> dict[str, list[str]]:
    sft = ["--task", "sft", "--data", str(chats)]
    classify = ["--task", "classify", "--data", str(spam)]
    return {
        "fsdp_lora_classify": [str(model_dir), *classify, "--lora-rank", "2", "--steps", "2"],
        "ep_lora_sft": [str(model_dir), *sft, "--ep", "2", "--lora-rank", "2", "--lora-targets", "attention", "mlp",
                        "experts", "--steps", "2"],
        "ep_full_classify": [str(model_dir), *classify, "--ep", "2", "--steps", "1"],
        "fp8_fsdp_sft": [str(fp8_dir), *sft, "--steps", "1"],
        "ep_mtp_head_sft": [str(model_dir), *sft, "--ep", "2", "--mtp-layers", "1", "--freeze", "main", "--steps", "1"],
    }


# On 4 ranks with --ep 2 the experts are also sharded by FSDP over the 2 ranks holding the same ones: each rank's
# block of experts is a chunk of its EP block (DTensor placements _StridedShard(0) x Shard(0) on the 2-D mesh)
FOUR_RANKS = ("ep2_dp2_lora_sft", "ep2_dp2_rows_sft")


def parts(argv: list[str]):
    """What `dsmoe finetune ARGV` runs on: (args, TrainConfig, FinetuneConfig)."""
    from dsmoe.finetune.cli import add_arguments, resolve

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([*argv, *FAST])
    cfg, ft, _, _ = resolve(args)
    return args, cfg, ft


def _on_each_rank(rank: int, world: int, all_jobs: dict[str, list[str]], out) -> None:
    from dsmoe.checkpoint import hf
    from dsmoe.finetune import trainer as ft_trainer
    from dsmoe.train.cli import start_runtime

    read = []
    counting = hf.read_tensor

    def read_tensor(*args):  # the bytes this rank reads from the checkpoint files
        t = counting(*args)
        read.append(t.numel() * t.element_size())
        return t

    hf.read_tensor = read_tensor
    for name, argv in all_jobs.items():
        args, cfg, ft = parts(argv)
        rt = start_runtime(args, cfg.device, "finetune")
        read.clear()
        trainer = ft_trainer.FinetuneTrainer(cfg, ft, out / name / "sharded", reducer=rt, progress=False)
        held = sum(p.to_local().numel() * p.element_size() for p in trainer.model.parameters())
        gathered = {n: p.full_tensor().contiguous() for n, p in trainer.model.named_parameters()}
        (out / name / f"rank{rank}.json").write_text(json.dumps({"read_bytes": sum(read), "held_bytes": held}))
        if rank == 0:
            save_file(gathered, out / name / "gathered.safetensors")
        if name not in TRAINED:
            continue
        trainer.train()
        # the same ranks loading BASE whole, as before sharded loading: parallelize() then drops the rest
        build = ft_trainer.build_pretrained
        ft_trainer.build_pretrained = lambda base, dtype, moe_impl: (
            hf.load_pretrained(base, dtype=dtype, device=rt.device, moe_impl=moe_impl), None)
        try:
            ft_trainer.FinetuneTrainer(cfg, ft, out / name / "whole", reducer=rt, progress=False).train()
        finally:
            ft_trainer.build_pretrained = build


@pytest.fixture(scope="module")
def fp8_dir(model_dir, tmp_path_factory):
    """model_dir with every projection in FP8 (e4m3 codes, one fp32 scale per 12 x 20 block)."""
    out = tmp_path_factory.mktemp("fp8")
    fp8 = {}
    for key, t in load_file(model_dir / "model.safetensors").items():
        if key.endswith(("proj.weight", "proj_with_mqa.weight")):
            fp8[key], fp8[key + "_scale_inv"] = quantize_blocks(t)
        else:
            fp8[key] = t
    save_file(fp8, out / "model.safetensors")
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": BLOCK}
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((model_dir / name).read_bytes())
    return out


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = BLOCK
    padded = torch.zeros(math.ceil(w.shape[0] / rows) * rows, math.ceil(w.shape[1] / cols) * cols)
    padded[:w.shape[0], :w.shape[1]] = w
    tiles = padded.view(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
    scale = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448
    codes = (tiles / scale[:, None, :, None]).view_as(padded)[:w.shape[0], :w.shape[1]]
    return codes.to(torch.float8_e4m3fn), scale


@pytest.fixture(scope="module")
def six_experts_dir(model_dir, tmp_path_factory):
    """model_dir's shape with 6 routed experts: 3 per EP rank, which 2 FSDP ranks split by rows (Shard(1))."""
    from dsmoe.checkpoint.hf import load_pretrained, save_pretrained
    from dsmoe.model.transformer import build_model

    out = tmp_path_factory.mktemp("six")
    torch.manual_seed(0)
    save_pretrained(build_model(load_pretrained(model_dir).config.replace(n_routed_experts=6)), out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((model_dir / name).read_bytes())
    return out


@pytest.fixture(scope="module")
def ran(model_dir, fp8_dir, six_experts_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    chats = folder / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {i}" + " please" * (i % 4)},
                                                      {"role": "assistant", "content": f"{i}!"}]}) + "\n"
                             for i in range(8)))
    spam = folder / "spam.jsonl"
    spam.write_text("".join(json.dumps({"text": f"win a prize now {i}", "label": "spam"} if i % 3 == 0 else
                                       {"text": f"see you at lunch {i}", "label": "ham"}) + "\n" for i in range(12)))
    all_jobs = jobs(model_dir, fp8_dir, chats, spam)
    all_jobs["ep2_dp2_lora_sft"] = all_jobs["ep_lora_sft"]
    all_jobs["ep2_dp2_rows_sft"] = [str(six_experts_dir), *all_jobs["ep_lora_sft"][1:]]
    out = tmp_path_factory.mktemp("runs")
    for name in all_jobs:
        (out / name).mkdir()
    run_distributed(_on_each_rank, 2, {k: v for k, v in all_jobs.items() if k not in FOUR_RANKS}, out, timeout_s=120)
    run_distributed(_on_each_rank, 4, {k: v for k, v in all_jobs.items() if k in FOUR_RANKS}, out, timeout_s=120)
    return all_jobs, out


@pytest.mark.parametrize("name", ["fsdp_lora_classify", "ep_lora_sft", "ep_full_classify", "fp8_fsdp_sft",
                                  "ep2_dp2_lora_sft", "ep2_dp2_rows_sft", "ep_mtp_head_sft"])
def test_each_rank_loads_its_shards_to_the_values_of_the_whole_load(ran, name, tmp_path):
    from dsmoe.finetune.trainer import FinetuneTrainer

    all_jobs, out = ran
    _, cfg, ft = parts(all_jobs[name])
    whole = FinetuneTrainer(cfg, ft, tmp_path / "one", progress=False).model
    sharded = load_file(out / name / "gathered.safetensors")
    expected = dict(whole.named_parameters())
    assert sharded.keys() == expected.keys()
    for key, tensor in sharded.items():
        assert torch.equal(tensor, expected[key].detach()), key
    if "mtp" in name:  # a new MTP module (BASE has none), drawn as one process draws it
        assert any(k.startswith("mtp.0.") for k in sharded) and sharded["mtp.0.eh_proj.weight"].abs().max() > 0
    if "lora" in name:  # the factors were drawn, not left as they came from to_empty
        assert any("lora_A" in k and t.abs().max() > 0 for k, t in sharded.items())
        assert all(not t.any() for k, t in sharded.items() if "lora_B" in k)


@pytest.mark.parametrize("name", TRAINED)
def test_a_fine_tune_from_the_sharded_load_trains_as_from_the_whole_load(ran, name):
    _, out = ran

    def steps(run):
        return [json.loads(line) for line in (out / name / run / "metrics.jsonl").read_text().splitlines()
                if '"grad_norm"' in line]

    sharded, whole = steps("sharded"), steps("whole")
    assert len(sharded) == 2
    for key in ("cls_loss" if "classify" in name else "lm_loss", "grad_norm"):
        assert [s[key] for s in sharded] == [s[key] for s in whole], key


def test_each_rank_reads_and_holds_half_of_the_model(ran, model_dir):
    _, out = ran
    ranks = [json.loads((out / "ep_lora_sft" / f"rank{r}.json").read_text()) for r in range(2)]
    checkpoint = load_file(model_dir / "model.safetensors")
    total = sum(t.numel() * t.element_size() for t in checkpoint.values())
    biases = sum(t.numel() * t.element_size() for k, t in checkpoint.items() if k.endswith("correction_bias"))
    # every byte of BASE is read by exactly one rank, but the router biases (buffers: each rank keeps them)
    assert sum(r["read_bytes"] for r in ranks) == total + biases
    assert all(r["read_bytes"] < 0.52 * total for r in ranks)
    gathered = load_file(out / "ep_lora_sft" / "gathered.safetensors")
    model_bytes = sum(t.numel() * t.element_size() for t in gathered.values())
    assert sum(r["held_bytes"] for r in ranks) == model_bytes
    assert all(r["held_bytes"] < 0.52 * model_bytes for r in ranks)


def test_a_tensor_replaced_by_one_of_another_shape_after_the_build_is_left_to_the_caller(model_dir):
    """A classifier base fine-tuned over other labels gets a new head: BASE's head is not read into it."""
    from dsmoe.checkpoint.hf import build_pretrained, load_pretrained

    model, weights = build_pretrained(model_dir)
    model.lm_head = torch.nn.Linear(model.config.hidden_size, 7, bias=False, device="meta")
    model.to_empty(device="cpu")
    assert weights.fill(model) == ["lm_head.weight"]
    whole = dict(load_pretrained(model_dir).named_parameters())
    for name, p in model.named_parameters():
        assert name == "lm_head.weight" or torch.equal(p, whole[name]), name
