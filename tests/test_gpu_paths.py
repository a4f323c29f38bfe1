"""What decides how the real setup uses its GPUs, held where a CPU can hold it: the device each process loads the model
onto, the trainer one process builds on a host of several GPUs, what `accelerate launch` under FSDP changes (the k-bit
preparation, the optimizer, activation checkpointing), the precision a card without bf16 gets, a GPU profile on a
machine without CUDA, the 7B profile's cadence, and bench/gpu.py (the first GPU's measurements) on the tiny shape, so
that it cannot rot.

Each test builds the library object the GPU run builds (TrainingArguments, SFTTrainer, accelerate's state and FSDP
plugin, the 4-bit model) under the topology a GPU host gives it: the environment `accelerate launch` sets, computed
by accelerate itself from our accelerate/*.yaml, or the device count TrainingArguments reads."""

import json
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, doc_pages
from omegaconf import OmegaConf
from test_model_stages import FAST, make_cfg, write_inputs

from nlistral import cli
from nlistral import trainer as trainer_module
from nlistral.config import compose_params
from nlistral.errors import ConfigError
from nlistral.evaluation import check_engine
from nlistral.model import device_map, load_base_model
from nlistral.trainer import build_trainer, one_gpu_per_process, training_args


def launch_env(config_file: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file FILE` gives each process it starts (accelerate's own code),
    less the per-process ranks: one process here."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(REPO / config_file), "-m", "nlistral", "train"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


@pytest.fixture
def under_fsdp(monkeypatch):
    """This process as `accelerate launch --config_file accelerate/fsdp_qlora.yaml` starts it."""
    env = launch_env("accelerate/fsdp_qlora.yaml")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def tiny_repo(built_base, tmp_path, monkeypatch):
    """A repo root with the embedded profile's base model and a small fine-tuning set; cwd is set to it."""
    write_inputs(tmp_path)
    shutil.copytree(built_base, tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_each_process_loads_the_model_onto_its_own_gpu(rank):
    """All on GPU 0 (`{"": 0}` in every process) put N copies on one card, and accelerate refuses to train a 4-bit
    model on another device than the process's own."""
    assert device_map(rank, cuda=True) == {"": rank}
    assert device_map(rank, cuda=False) == {"": "cpu"}


def test_one_process_on_a_host_of_four_gpus_builds_the_trainer_with_the_configured_batch(tiny_repo, monkeypatch):
    """transformers/training_args.py (`_setup_devices`: `self._n_gpu = torch.cuda.device_count()`) counts every
    visible GPU in one process, and trl/trainer/sft_trainer.py (`SFTTrainer.__init__`: `if args.n_gpu > 1: raise
    ValueError(... does not support nn.DataParallel ...)`) then refuses to build: `dvc exp run` on a 2-GPU workstation
    failed unless CUDA_VISIBLE_DEVICES hid all but one. Seen failing while one_gpu_per_process ran after SFTTrainer().
    The CPU has no GPUs, so the arguments get, once their devices are set up, the count a four-GPU host gives them."""
    real_args = trainer_module.training_args

    def on_four_gpus(cfg, output_dir):
        args = real_args(cfg, output_dir)
        assert args.device.type == "cpu"  # devices set up (cached) as on this machine ...
        args._n_gpu = 4  # ... then what torch.cuda.device_count() sets on a four-GPU host
        return args

    monkeypatch.setattr(trainer_module, "training_args", on_four_gpus)
    cfg = make_cfg(**FAST)
    trainer = build_trainer(cfg, tiny_repo / "scratch")
    assert trainer.args.n_gpu == 1 and trainer.args.train_batch_size == cfg.train.per_device_batch_size == 4


def test_one_gpu_per_process_keeps_the_batch_a_four_gpu_host_would_multiply():
    """TrainingArguments.train_batch_size = per_device x n_gpu: ablation1's 16 rows would be 64 on GPU 0."""
    cfg = OmegaConf.create(compose_params(["experiment=ablation1"], conf_dir=REPO / "conf"))
    args = training_args(cfg, "unused")
    args._n_gpu = 4  # what `torch.cuda.device_count()` sets on a four-GPU host
    assert args.train_batch_size == 64
    one_gpu_per_process(args)
    assert args.train_batch_size == cfg.train.per_device_batch_size == 16


def test_under_fsdp_the_4bit_model_keeps_one_dtype_for_fsdp_to_flatten(tiny_repo, under_fsdp):
    """accelerate/state.py: PartialState only ever reports MULTI_GPU / MULTI_CPU / NO, never FSDP (AcceleratorState
    knows FSDP, and the Trainer creates it after the model loaded), so load_base_model, which asked PartialState, ran
    peft's prepare_model_for_kbit_training under FSDP: norms, embeddings and lm_head in float32 next to the bfloat16
    4-bit storage, and FSDP1 stops at "Must flatten tensors with uniform dtype". Seen failing before load_base_model
    read ACCELERATE_USE_FSDP, as accelerate (state.py) and transformers (distributed/fsdp.py) do."""
    from accelerate.utils import DistributedType

    from accelerate import PartialState

    assert under_fsdp["ACCELERATE_USE_FSDP"] == "true"
    assert PartialState().distributed_type != DistributedType.FSDP  # the library fact the old check relied on
    cfg = make_cfg(**{"model.dtype": "bfloat16", "model.bnb_4bit_quant_storage": "bfloat16"})  # as documented
    model = load_base_model(cfg, for_training=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


FSDP_STORAGE = {"model.dtype": "bfloat16", "model.bnb_4bit_quant_storage": "bfloat16"}  # as documented for FSDP


def test_under_fsdp_the_4bit_weights_must_be_stored_in_the_compute_dtype(tiny_repo, under_fsdp, tmp_path):
    """torch/distributed/fsdp/_flat_param.py (`_validate_tensors_to_flatten`): FSDP1 flattens each wrapped layer's
    parameters into one tensor, "Cannot flatten integer dtype tensors" (the profiles' default
    bnb_4bit_quant_storage=uint8) and "Must flatten tensors with uniform dtype" (bfloat16 storage beside float32
    norms). The command in accelerate/fsdp_qlora.yaml asks for bnb_4bit_quant_storage=bfloat16, but nothing held a run
    that forgot it: it loaded 7B weights on every GPU and stopped in Trainer.train(). The real FSDP wrapper (a gloo
    group of one process; the auto-wrap policy transformers' update_fsdp_plugin_peft sets, LoRA layers apart) shows
    which pairs shard (and train: a forward and backward pass); the trainer refuses the others before any work,
    exit 2. Seen failing before the refusal."""
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel

    pairs = {("bfloat16", "uint8"): "Cannot flatten integer dtype tensors",
             ("float32", "bfloat16"): "Must flatten tensors with uniform dtype", ("bfloat16", "bfloat16"): None,
             ("float32", "float32"): None}  # fmt: skip
    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    models = {pair: get_peft_model(load_base_model(make_cfg(**{"model.dtype": pair[0],
                                                                "model.bnb_4bit_quant_storage": pair[1]}),
                                                   for_training=True), lora)
              for pair in pairs}  # fmt: skip
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for pair, error in pairs.items():

            def wrap(model=models[pair]):
                policy = fsdp_auto_wrap_policy(model)
                return FullyShardedDataParallel(model, use_orig_params=False, device_id=torch.device("cpu"),
                                                auto_wrap_policy=policy)  # fmt: skip

            if error:
                with pytest.raises(ValueError, match=error):
                    wrap()
            else:  # and it trains: one forward and backward pass through the sharded 4-bit layers
                sharded = wrap()
                ids = torch.randint(0, sharded.config.vocab_size, (2, 16))
                sharded(input_ids=ids, labels=ids).loss.backward()
                trained = [p for p in sharded.parameters() if p.requires_grad]
                assert trained and all(p.grad is not None for p in trained)
                assert any(p.grad.abs().sum() > 0 for p in trained)  # lora_B's (lora_A's are 0 while B is 0)
    finally:
        dist.destroy_process_group()
    for (dtype, storage), error in pairs.items():
        cfg = make_cfg(**{**FAST, "model.dtype": dtype, "model.bnb_4bit_quant_storage": storage})
        if error:
            with pytest.raises(ConfigError, match=rf"^model.bnb_4bit_quant_storage={storage}: .*FSDP.*"
                                                  rf"model.bnb_4bit_quant_storage={dtype}$"):  # fmt: skip
                build_trainer(cfg, tiny_repo / "scratch")
            assert not (tiny_repo / "scratch").exists()
        else:
            training_args(cfg, tiny_repo / "scratch")


def test_under_fsdp_an_8bit_optimizer_is_refused_before_any_work(tiny_repo, under_fsdp, capsys):
    """FSDP1 keeps optimizer state shaped like its flat parameters; bitsandbytes' 8-bit state is not (bitsandbytes #89,
    accelerate #1362): the study configs' paged_adamw_8bit under accelerate/fsdp_qlora.yaml. Refused with the key and a
    choice that works, exit 2, before a model loads or a checkpoint folder is made."""
    cfg = make_cfg(**{**FAST, **FSDP_STORAGE, "train.optim": "paged_adamw_8bit"})
    with pytest.raises(ConfigError, match=r"^train.optim=paged_adamw_8bit: .*FSDP; use train.optim=adamw_torch"):
        build_trainer(cfg, tiny_repo / "scratch")
    assert not (tiny_repo / "scratch").exists()
    cfg.train.optim = "adamw_torch"
    assert training_args(cfg, tiny_repo / "scratch").optim == "adamw_torch"


def test_under_fsdp_its_own_wrapper_checkpoints_activations_not_the_trainer(under_fsdp):
    """accelerate/fsdp_qlora.yaml turns on fsdp_activation_checkpointing (accelerate's FullyShardedDataParallelPlugin
    reads FSDP_ACTIVATION_CHECKPOINTING and wraps each decoder layer; it refuses to be built without an accelerator),
    so the Trainer's gradient checkpointing must be off: both would all-gather every layer again in the backward pass
    (transformers #30404). Seen failing with the Trainer's on under FSDP. Without FSDP the Trainer's stays on."""
    assert under_fsdp["FSDP_ACTIVATION_CHECKPOINTING"] == "true"
    documented = ["experiment=ablation1", "model.bnb_4bit_quant_storage=bfloat16", "train.optim=adamw_torch"]
    cfg = OmegaConf.create(compose_params(documented, conf_dir=REPO / "conf"))
    assert cfg.train.gradient_checkpointing is True
    assert training_args(cfg, "unused").activation_checkpointing is False


def test_without_fsdp_the_trainer_checkpoints_activations():
    cfg = OmegaConf.create(compose_params(["experiment=ablation1"], conf_dir=REPO / "conf"))
    assert training_args(cfg, "unused").activation_checkpointing is True


def test_float16_qlora_is_refused_since_trl_trains_the_adapter_in_bfloat16(tiny_repo):
    """trl/trainer/sft_trainer.py ("When using QLoRA, the PEFT adapter weights are converted to bf16"): a quantized
    model's trainable parameters become bfloat16 whatever the arguments say, and `model.dtype=float16` gave bf16=False
    and never fp16=True (no autocast, no grad scaler): on a card without bf16 (T4, V100) it trains bfloat16 weights it
    cannot compute. The safer of the two fixes: refuse it, exit 2, naming model.dtype and what to use instead. The real
    SFTTrainer shows the cast this guards against."""
    trainer = build_trainer(make_cfg(**FAST), tiny_repo / "scratch")  # 4-bit, model.dtype=float32
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.bfloat16}
    with pytest.raises(ConfigError, match=r"^model.dtype=float16: .*model.dtype=float32"):
        training_args(make_cfg(**{**FAST, "model.dtype": "float16"}), tiny_repo / "scratch")


def test_a_gpu_profile_on_a_machine_without_cuda_stops_before_loading_anything(workdir, capsys):
    """model.py fell back to `{"": "cpu"}`: a container started without --gpus, or a torch build newer than the
    driver, silently loaded Mistral-7B on the CPU. `model.requires_cuda` (conf/model/mistral7b.yaml) stops
    base-model, train (load_base_model) and the hf engine's evaluate stages first, exit 2 and one line naming the
    override; `model.allow_cpu=true` lets it through, and the server engine (the GPU is the server's) is not held."""
    assert not torch.cuda.is_available()
    assert cli.main(["base-model", "model=mistral7b"]) == 2
    error = capsys.readouterr().err.strip()
    assert "no CUDA device is visible" in error and "model.allow_cpu=true" in error and "\n" not in error
    assert not (workdir / "models").exists()
    cfg = OmegaConf.create(compose_params(["experiment=ablation1"], conf_dir=REPO / "conf"))
    for refused in (lambda: load_base_model(cfg, for_training=True), lambda: check_engine(cfg)):
        with pytest.raises(ConfigError, match="^model.requires_cuda: "):
            refused()
    cfg.eval.engine = "server"
    check_engine(cfg)
    cfg.eval.engine, cfg.model.allow_cpu = "hf", True
    check_engine(cfg)


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
    # what ran, exactly (docs cite these JSONs): the command line and torch's own build tag (2.11.0+cu130, not 2.11.0)
    assert result["command"].startswith("python bench/gpu.py --shape tiny --warmup 1 --steps 1 --rows 3")
    import torch

    assert result["versions"]["torch"] == torch.__version__
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


def test_the_vllm_environment_can_serve_the_4bit_base_its_templates_ask_for():
    """Every eval.server template serves the base with `--quantization bitsandbytes`, but vLLM 0.28 removed bitsandbytes
    from its tree (vllm-project/vllm#43529: vllm/model_executor/layers/quantization/bitsandbytes.py and
    model_loader/bitsandbytes_loader.py are gone; the `vllm-bnb-plugin` package registers both through the
    `vllm.general_plugins` entry point). requirements-vllm.txt pinned vllm==0.33.0 alone, so the server `make vllm-env`
    builds would refuse every documented command. Seen failing before the plugin was pinned beside it."""
    from packaging.requirements import Requirement
    from packaging.version import Version
    from test_evaluate import vllm_commands

    lines = (REPO / "requirements-vllm.txt").read_text().splitlines()
    pins = {(req := Requirement(line.split("#")[0])).name: req for line in lines if line.split("#")[0].strip()}
    (vllm,) = pins["vllm"].specifier
    venv_templates = [command for path, command, docker in vllm_commands() if not docker and "{base}" in command]
    assert venv_templates and all("--quantization bitsandbytes" in command for command in venv_templates)
    if Version(vllm.version) >= Version("0.28.0"):
        assert "vllm-bnb-plugin" in pins and str(pins["vllm-bnb-plugin"].specifier).startswith("==")


def test_the_pinned_vllm_knows_bitsandbytes():
    """Where .venv-vllm exists (a CUDA machine: `make vllm-env`), vLLM itself, its plugins loaded as `vllm serve`
    loads them, lists the method (not run here: no .venv-vllm on a CPU machine)."""
    python = REPO / ".venv-vllm/bin/python"
    if not python.exists():
        pytest.skip("no .venv-vllm (make vllm-env, on a CUDA machine)")
    code = ("from vllm.plugins import load_general_plugins; load_general_plugins(); "
            "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS; "
            "print('bitsandbytes' in QUANTIZATION_METHODS)")  # fmt: skip
    assert subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"


def test_under_fsdp_the_parameter_counts_are_the_models_not_a_shards(tiny_repo, monkeypatch, tmp_path):
    """transformers/trainer.py (`if self.is_fsdp_enabled ...: self.model = self.model_wrapped = model`): after train()
    under FSDP, `trainer.model` is the wrapper, whose flat parameters are this rank's shard and no longer bitsandbytes'
    Params4bit (peft's get_nb_trainable_parameters counts those twice per stored byte). metrics/train.json's
    trainable_params and total_params, read from trainer.model after training, then undercounted (here, one rank:
    the 4-bit weights counted as stored). The real train stage runs; its trainer's model is then wrapped in torch's
    FSDP (a gloo group of one process, peft's auto-wrap policy) as transformers' FSDP branch does. Seen failing while
    the stage counted after training."""
    import torch.distributed as dist
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel
    from trl import SFTTrainer

    from nlistral.stages import train

    counted = []
    real_train = SFTTrainer.train

    def train_then_wrapped(self, *args, **kwargs):
        result = real_train(self, *args, **kwargs)
        counted.append(self.model.get_nb_trainable_parameters())
        policy = fsdp_auto_wrap_policy(self.model)
        self.model = self.model_wrapped = FullyShardedDataParallel(self.model, use_orig_params=False,
                                                                   device_id=torch.device("cpu"),
                                                                   auto_wrap_policy=policy)  # fmt: skip
        return result

    monkeypatch.setattr(SFTTrainer, "train", train_then_wrapped)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        metrics = train.run(make_cfg(**{**FAST, "model.bnb_4bit_quant_storage": "float32"}))  # FSDP flattens these
    finally:
        dist.destroy_process_group()
    assert counted and (metrics["trainable_params"], metrics["total_params"]) == counted[0]
