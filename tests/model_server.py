"""A real OpenAI-compatible model server on 127.0.0.1 for the tests and bench: the stand-in for `vllm serve`.

    python tests/model_server.py BASE [--revision REV] [--quantization bitsandbytes] [--tokenizer DIR]
        [--enable-lora] [--lora-modules NAME=DIR ...] [--max-lora-rank R] [--host 127.0.0.1] [--port P]
        [--config-format auto|hf|mistral] [--generation-config G]

It takes the flags the documented `vllm serve` commands carry: `--max-lora-rank` only from vLLM's MaxLoRARanks (as
vLLM refuses any other), `--host` only 127.0.0.1 (where it always listens); `--config-format` and
`--generation-config` are accepted and change nothing here.

Like vLLM it loads the base weights (transformers: float32, or 4-bit NF4 with `--quantization bitsandbytes`, as the
hf engine loads a QLoRA base; `--revision` counts for a hub id, a folder has none) and each LoRA adapter (peft)
under its name, lists the base (as BASE) and the adapters at GET /v1/models, and answers POST /v1/chat/completions
for either: the tokenizer's chat template applied to the messages with the generation prompt, tokenized without
added special tokens, greedy decoding for `max_tokens`, finish_reason `stop` at EOS (EOS not in the text) or at a
`stop` string (left out of the text), or `length`. `usage.completion_tokens` counts the tokens before EOS (vLLM's
count includes the EOS). `logprobs: true` with `top_logprobs: K` returns OpenAI's `choices[0].logprobs.content`: per
generated token before EOS, its text, logprob, bytes and its step's K likeliest tokens (each token's text is its
own decode). It serves one request at a time; it refuses a temperature other than 0 (this server only
decodes greedily).

For the tests, set in the environment (so the command, part of the reply cache's key, stays the same):
MODEL_SERVER_DIE_AFTER=N exits (code 3, no reply) when chat request N + 1 arrives; MODEL_SERVER_REQUESTS_LOG=FILE
appends one line (the model name) per chat request it answers.
"""

import argparse
import json
import os
import threading
import time
import uuid
from contextlib import nullcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from nlistral.evaluation import VLLM_LORA_RANKS


class Model:
    def __init__(self, base: str, tokenizer: str | None, adapters: dict[str, str], revision: str, quantization):
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or base, local_files_only=True)
        four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(base, revision=revision, dtype=torch.float32,
                                                     quantization_config=four_bit if quantization else None,
                                                     local_files_only=True)  # fmt: skip
        if adapters:
            from peft import PeftModel

            names = iter(adapters)
            first = next(names)
            model = PeftModel.from_pretrained(model, adapters[first], adapter_name=first)
            for name in names:
                model.load_adapter(adapters[name], adapter_name=name)
        self.model = model.eval()
        self.base = base
        self.adapters = adapters
        self.lock = threading.Lock()

    @torch.inference_mode()
    def complete(self, name: str, messages: list[dict], max_tokens: int, stop=None, top_logprobs=None
                 ) -> tuple[str, str, int, int, list | None]:  # fmt: skip
        tok = self.tokenizer
        stops = {"stop_strings": stop, "tokenizer": tok} if stop else {}
        stops |= {"output_logits": True, "return_dict_in_generate": True}
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with self.lock:
            if name in self.adapters:
                self.model.set_adapter(name)
                out = self.model.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False,
                                          pad_token_id=tok.pad_token_id, **stops)  # fmt: skip
            else:
                with self.model.disable_adapter() if self.adapters else nullcontext():
                    out = self.model.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False,
                                              pad_token_id=tok.pad_token_id, **stops)  # fmt: skip
        new = out.sequences[0, ids.shape[1] :].tolist()
        stopped = tok.eos_token_id in new
        new = new[: new.index(tok.eos_token_id)] if stopped else new
        content = None
        if top_logprobs is not None:
            content = []
            for token, logits in zip(new, out.logits, strict=False):
                logprobs = logits[0].float().log_softmax(-1)
                top = logprobs.topk(int(top_logprobs))
                content.append(
                    entry(tok, token, logprobs[token])
                    | {
                        "top_logprobs": [
                            entry(tok, t, v) for t, v in zip(top.indices.tolist(), top.values, strict=True)
                        ]
                    }
                )
        text = tok.decode(new, skip_special_tokens=True)
        if (cut := min((text.find(s) for s in stop or () if s in text), default=-1)) >= 0:
            text, stopped = text[:cut], True
        return text, "stop" if stopped else "length", ids.shape[1], len(new), content


def entry(tok, token: int, logprob) -> dict:
    text = tok.decode([token])
    return {"token": text, "logprob": float(logprob), "bytes": list(text.encode())}


def serve(model: Model, port: int, die_after: int | None, requests_log: str | None) -> None:
    served = [0]
    names = [model.base, *model.adapters]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") != "/v1/models":
                return self.send(404, {"message": "Not Found"})
            return self.send(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self.send(404, {"message": "Not Found"})
            if die_after is not None and served[0] >= die_after:
                os._exit(3)
            if body.get("model") not in names:
                return self.send(404, {"message": f"The model `{body.get('model')}` does not exist."})
            if body.get("temperature", 1.0) != 0:
                return self.send(400, {"message": "this server decodes greedily only: send temperature 0"})
            top = body.get("top_logprobs", 0) if body.get("logprobs") else None
            text, finish, prompt_tokens, completion_tokens, content = model.complete(
                body["model"], body["messages"], int(body.get("max_tokens") or 16), body.get("stop"), top
            )
            served[0] += 1
            if requests_log:
                with open(requests_log, "a", encoding="utf-8") as log:
                    log.write(body["model"] + "\n")
            return self.send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                             "logprobs": {"content": content} if content is not None else None}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            })  # fmt: skip

    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    httpd.daemon_threads = True
    print(f"serving {', '.join(names)} on http://127.0.0.1:{httpd.server_address[1]}/v1", flush=True)
    httpd.serve_forever(0.1)


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("--revision", default="main")
    parser.add_argument("--quantization", choices=["bitsandbytes"])
    parser.add_argument("--tokenizer")
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--lora-modules", nargs="*", default=[], metavar="NAME=DIR")
    parser.add_argument("--max-lora-rank", type=int, default=16, choices=VLLM_LORA_RANKS)  # vLLM's MaxLoRARanks
    parser.add_argument("--host", choices=["127.0.0.1"], default="127.0.0.1")  # the stand-in listens on loopback only
    parser.add_argument("--config-format", choices=["auto", "hf", "mistral"], default="auto")  # accepted, unused
    parser.add_argument("--generation-config", default="auto")  # accepted, unused: greedy decoding either way
    parser.add_argument("--port", type=int, default=8000)
    return parser


def main() -> None:
    parser = argument_parser()
    args = parser.parse_args()
    adapters = dict(module.split("=", 1) for module in args.lora_modules)
    if adapters and not args.enable_lora:
        parser.error("--lora-modules needs --enable-lora")
    for name, path in adapters.items():
        rank = json.loads(Path(path, "adapter_config.json").read_text(encoding="utf-8"))["r"]
        if rank > args.max_lora_rank:
            parser.error(f"adapter {name} has rank {rank} > --max-lora-rank {args.max_lora_rank}")
    die_after = int(os.environ["MODEL_SERVER_DIE_AFTER"]) if os.environ.get("MODEL_SERVER_DIE_AFTER") else None
    model = Model(args.base, args.tokenizer, adapters, args.revision, args.quantization)
    serve(model, args.port, die_after, os.environ.get("MODEL_SERVER_REQUESTS_LOG"))


if __name__ == "__main__":
    main()
