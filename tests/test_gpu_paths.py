"""What decides how the real setup uses its GPUs, held where a CPU can hold it: the device each process loads the model
onto, the batch one process trains with on a host of several GPUs, the 7B profile's cadence, and bench/gpu.py (the
first GPU's measurements) on the tiny shape, so that it cannot rot."""

import json
import shlex
import subprocess
import sys

import pytest
from conftest import REPO, doc_pages
from omegaconf import OmegaConf

from nlistral.config import compose_params
from nlistral.model import device_map
from nlistral.trainer import one_gpu_per_process, training_args


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_each_process_loads_the_model_onto_its_own_gpu(rank):
    """All on GPU 0 (`{"": 0}` in every process) put N copies on one card, and accelerate refuses to train a 4-bit
    model on another device than the process's own."""
    assert device_map(rank, cuda=True) == {"": rank}
    assert device_map(rank, cuda=False) == {"": "cpu"}


def test_one_process_on_a_host_of_four_gpus_keeps_the_configured_batch():
    """TrainingArguments counts every visible GPU into the batch (per_device x n_gpu) yet the Trainer never wraps a
    4-bit model in DataParallel: ablation1's 16 rows became 64 on GPU 0. The CPU has no GPUs, so the arguments are
    given the count a four-GPU host gives them."""
    cfg = OmegaConf.create(compose_params(["experiment=ablation1"], conf_dir=REPO / "conf"))
    args = training_args(cfg, "unused")
    args._n_gpu = 4  # what `torch.cuda.device_count()` sets on a four-GPU host
    assert args.train_batch_size == 64
    one_gpu_per_process(args)
    assert args.train_batch_size == cfg.train.per_device_batch_size == 16


@pytest.mark.parametrize("experiment", ["mistral7b_qlora", "ablation0", "ablation1", "ablation2"])
def test_the_7b_profiles_evaluate_and_stop_at_a_7b_cadence(experiment):
    """The tiny profile's 20-step cadence inside a 7B run stops training in the warm-up's noise."""
    train = OmegaConf.create(compose_params([f"experiment={experiment}"], conf_dir=REPO / "conf")).train
    assert train.eval_steps == train.save_steps == 250 and train.early_stopping_patience == 3


def test_bench_gpu_runs_on_the_cpu_with_the_tiny_shape(tmp_path):
    """bench/gpu.py end to end on the tiny shape: training, the hf engine, and the server engine through the stand-in
    for `vllm serve` (the stage starts and stops it), with ablation1's settings."""
    server = (f"{shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'tests/model_server.py'))} {{base}} "
              "--revision {revision} --quantization bitsandbytes --tokenizer {tokenizer} --enable-lora "
              "--lora-modules {name}={adapter} --max-lora-rank {rank} --port {port}")  # fmt: skip
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, "bench/gpu.py", "--shape", "tiny", "--warmup", "1", "--steps", "1", "--rows", "3",
                    "--server-command", server, "--out", str(out)], cwd=REPO, check=True)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["shape"] == "tiny" and result["card"].startswith("CPU")
    assert (result["lora_r"], result["optim"], result["gradient_checkpointing"], result["max_seq_length"]) == (
        16, "paged_adamw_8bit", True, 512)  # fmt: skip
    assert result["train"]["train_batch_size"] == 16 and result["train"]["rows_per_step"] == 32
    assert result["train"]["timed_steps"] == 1 and result["train"]["tokens_per_s"] > 0
    for engine in ("generate_hf", "generate_server"):
        assert result[engine]["rows"] == 3 and result[engine]["failed"] == 0 and result[engine]["samples_per_s"] > 0


def test_bench_gpu_variants_run_on_the_cpu_with_the_tiny_shape(tmp_path):
    """bench/gpu.py --variants on the tiny shape: padding-free on/off and gradient checkpointing on/off (padding-free
    processes no pad, the padded batches do), generation vs label scoring of the label task (no token generated),
    the bf16-merged adapter beside the 4-bit unmerged one on the same rows; the JSON names its command."""
    out = tmp_path / "gpu.json"
    command = ["bench/gpu.py", "--shape", "tiny", "--warmup", "1", "--steps", "1", "--rows", "3", "--variants",
               "--out", str(out)]  # fmt: skip
    subprocess.run([sys.executable, *command], cwd=REPO, check=True)
    result = json.loads(out.read_text())
    assert result["command"] == " ".join(["python", *command])
    variants = result["variants"]
    for name in ("padding_free", "padded", "padding_free_no_checkpointing", "padded_no_checkpointing"):
        train = variants[f"train_{name}"]
        assert train["padding_free"] is name.startswith("padding_free") and train["tokens_per_s"] > 0
        assert train["gradient_checkpointing"] is not name.endswith("no_checkpointing")
        assert (train["pad_token_share"] == 0) is train["padding_free"]
    assert variants["evaluate_label_likelihood"]["mean_output_tokens"] == 0
    assert variants["evaluate_label_generate"]["mean_output_tokens"] > 0
    merged = variants["generate_bf16_merged"]
    assert merged["rows"] == variants["generate_4bit_unmerged"]["rows"] == 3
    assert 0 <= merged["same_output_as_4bit_unmerged"] <= 1


def test_the_image_runs_as_the_users_uid_and_gpu_runs_share_memory():
    """A root container writes root-owned models/, .dvc/cache and git objects into the mounted checkout, after which
    the user's own git and dvc fail; NCCL across GPUs (and vLLM) need the host's shared memory (--ipc=host)."""
    lines = (REPO / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(line.startswith("ARG UID") for line in lines)
    documented = "".join(page.read_text() for page in [*doc_pages(), REPO / "Dockerfile"])
    gpu_runs = [line for line in documented.splitlines() if "docker run" in line and "--gpus" in line]
    assert len(gpu_runs) >= 3 and all("--ipc=host" in line for line in gpu_runs)  # vLLM's image asks for it too
