"""mixtral-chat beside llama.cpp on the same machine and the same checkpoint: decode and prefill.

    python bench/bench_peer.py                           # real widths (2 layers) and small widths
    python bench/bench_peer.py --shapes small --rounds 5
    python bench/bench_peer.py --shapes real --layers 2 --prompt-tokens 512 --tokens 32
    python bench/bench_peer.py --avx2-only               # both engines on AVX2 code alone

Both start from one bf16 safetensors checkpoint in the Hugging Face layout that this script
writes (random weights, std 0.02, Mixtral's tokenizer from mistral-common):
- "real": Mixtral-8x7B's widths (hidden 4096, intermediate 14336, 8 experts top-2, GQA 32/8,
  vocab 32000) with `--layers` layers (2 fit in 24 GB of RAM: 6.4 GB of bf16);
- "small": hidden 512, intermediate 1024, 6 layers (~150M parameters).
mixtral-chat quantizes it (`quantize_model_dir`, int4 g64, what `mixtral-chat quantize` does);
llama.cpp converts it with `convert_hf_to_gguf.py --outtype bf16` from the llama-cpp-python sdist,
then quantizes it to Q4_0 (`llama_model_quantize`).

llama.cpp is not a dependency of mixtral-chat: on first run the script makes a venv of its own
(`<workdir>/venv`) and installs llama-cpp-python from PyPI there, built without -march=native
(CMAKE_ARGS below: the native build segfaulted on a Sapphire Rapids host for every quantized
type), and unpacks the same version's sdist for its converter. Later runs reuse both.

Each round runs one fresh process per engine, alternating which goes first, each loading the
model, then timing a prefill of `--prompt-tokens` random token ids (time to the first token's
logits) and a greedy decode of `--tokens` tokens after it (EOS ignored), on all cores (2 here),
with nothing else of ours running. Reported: per round tok/s of each, and the median over rounds
of the per-round ratios (mixtral-chat / llama.cpp), so that a shared machine's load, which
slows both alike within a round, cancels out of the ratio. Prints markdown.

`--avx2-only` stands in for an AVX2-only host on an AVX-512 one: llama.cpp built without any
AVX-512 (`<workdir>/venv-avx2`, LLAMA_AVX2_CMAKE_ARGS) against our kernel capped to AVX2
(MIXTRAL_CHAT_NATIVE_ISA=avx2). The memory system and cores are still this host's, so it shows
the code paths, not an AVX2 machine's bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LLAMA_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON"
LLAMA_AVX2_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF "
    "-DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF"
)
SHAPES = {
    "real": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=32000,
    ),
    "small": dict(
        hidden_size=512,
        intermediate_size=1024,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=32000,
        num_hidden_layers=6,
    ),
}
Q4_0 = 2  # LLAMA_FTYPE_MOSTLY_Q4_0


# --- the checkpoint (this venv: torch, transformers) ------------------------------------------


def write_checkpoint(directory: Path, shape: dict, seed: int = 0, shard_bytes: int = 2 << 30) -> Path:
    """Random bf16 weights in the HF layout, shard by shard (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    if (directory / "model.safetensors.index.json").exists():
        return directory
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = MixtralConfig(
        **shape, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False
    )
    config.architectures = ["MixtralForCausalLM"]  # what the GGUF converter reads
    config.save_pretrained(tmp)
    sys.path.insert(0, str(REPO_ROOT))
    from tests.conftest import mistral_tokenizer_path

    shutil.copy(mistral_tokenizer_path(), tmp / "tokenizer.model")
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    d = config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads * d
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}"
        shapes += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (config.num_attention_heads * d, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, config.num_attention_heads * d)),
            (f"{p}.block_sparse_moe.gate.weight", (config.num_local_experts, h)),
        ]
        for e in range(config.num_local_experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            shapes += [(f"{q}.w1.weight", (i, h)), (f"{q}.w2.weight", (h, i)), (f"{q}.w3.weight", (i, h))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, tmp / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, dims in shapes:
        if len(dims) == 1:
            tensor = torch.ones(dims, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(dims, generator=generator) * 0.02).to(torch.bfloat16)
        shard[name] = tensor
        size += tensor.numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def quantize_ours(source: Path, target: Path) -> Path:
    from mixtral_chat.quant import quantize_model_dir

    if not (target / "quant_config.json").exists():
        quantize_model_dir(source, target, "int4", 64)
    return target


# --- llama.cpp (its own venv) -----------------------------------------------------------------


def llama_venv(workdir: Path, avx2_only: bool = False) -> Path:
    """The venv's python with llama-cpp-python importable: made and installed if needed."""
    venv = workdir / ("venv-avx2" if avx2_only else "venv")
    python = venv / "bin" / "python"
    if (
        python.exists()
        and subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    ):
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    env = {
        **os.environ,
        "CMAKE_ARGS": LLAMA_AVX2_CMAKE_ARGS if avx2_only else LLAMA_CMAKE_ARGS,
        "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
    }
    print("installing llama-cpp-python (a build from source: ~15 min on 2 cores)", file=sys.stderr)
    subprocess.run(
        [python, "-m", "pip", "install", "--no-cache-dir", "llama-cpp-python"], check=True, env=env
    )
    return python


def llama_converter(workdir: Path, python: Path) -> Path:
    """convert_hf_to_gguf.py from the sdist of the installed llama-cpp-python version."""
    version = subprocess.run(
        [python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    root = workdir / "sdist" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (root / "convert_hf_to_gguf.py").exists():
        archive = workdir / "sdist" / f"llama_cpp_python-{version}.tar.gz"
        if not archive.exists():
            subprocess.run(
                [
                    python,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    "-d",
                    str(archive.parent),
                    f"llama-cpp-python=={version}",
                ],
                check=True,
            )
        with tarfile.open(archive) as tar:
            tar.extractall(archive.parent, filter="data")
    return root / "convert_hf_to_gguf.py"


def convert_llama(source: Path, target: Path, converter: Path, python: Path) -> Path:
    """bf16 GGUF by the converter (run by this venv's python: it needs torch), then Q4_0."""
    if target.exists():
        return target
    bf16 = target.with_suffix(".bf16.gguf")
    if not bf16.exists():
        env = {**os.environ, "PYTHONPATH": str(converter.parent / "gguf-py")}
        subprocess.run(
            [sys.executable, str(converter), str(source), "--outtype", "bf16", "--outfile", str(bf16)],
            check=True,
            env=env,
        )
    script = (
        "import sys, llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = {Q4_0}\n"
        "p.nthread = 0\n"
        "tmp = sys.argv[2] + '.tmp'\n"
        "rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), tmp.encode(), p)\n"
        "import os; os.replace(tmp, sys.argv[2]) if rc == 0 else sys.exit(rc)\n"
    )
    subprocess.run([python, "-c", script, str(bf16), str(target)], check=True)
    bf16.unlink()
    return target


# --- workers: one process per measurement -----------------------------------------------------


def prompt_ids(count: int, vocab: int = 32000) -> list[int]:
    """Fixed pseudo-random token ids (no special tokens), the same for both engines."""
    state, ids = 12345, [1]
    while len(ids) < count:
        state = (state * 1103515245 + 12345) % (1 << 31)
        ids.append(3 + state % (vocab - 3))
    return ids


def worker_llama(model: Path, prompt_tokens: int, tokens: int, threads: int) -> dict:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        str(model),
        n_ctx=prompt_tokens + tokens + 8,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    vocab = llm.n_vocab()

    def last_argmax() -> int:  # the last evaluated token's logits (logits_all=False keeps no copy)
        logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(vocab,))))

    prompt = prompt_ids(prompt_tokens)
    llm.eval(prompt[:8])  # warm-up: first-call allocations
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - t0
    token = last_argmax()
    t0 = time.perf_counter()
    for _ in range(tokens):
        llm.eval([token])
        token = last_argmax()
    decode = time.perf_counter() - t0
    return {"prefill_tok_s": prompt_tokens / prefill, "decode_tok_s": tokens / decode}


def worker_ours(model: Path, prompt_tokens: int, tokens: int, threads: int) -> dict:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as app/cli.py does
    import torch

    from mixtral_chat.engine.options import LoadOptions
    from mixtral_chat.engine.runtime import Engine

    torch.set_num_threads(threads)
    engine = Engine.load(model, LoadOptions(device="cpu"))
    net = engine.model
    net.setup_cache(prompt_tokens + tokens + 8)
    prompt = torch.tensor([prompt_ids(prompt_tokens)])
    with torch.inference_mode():
        net(prompt[:, :8], torch.arange(8), last_only=True)  # warm-up, as for llama.cpp
        t0 = time.perf_counter()
        logits = net(prompt, torch.arange(prompt_tokens), last_only=True)
        prefill = time.perf_counter() - t0
        token = int(logits[0, -1].argmax())
        t0 = time.perf_counter()
        for pos in range(prompt_tokens, prompt_tokens + tokens):
            logits = net(torch.tensor([[token]]), torch.tensor([pos]))
            token = int(logits[0, -1].argmax())
        decode = time.perf_counter() - t0
    return {"prefill_tok_s": prompt_tokens / prefill, "decode_tok_s": tokens / decode}


def run_worker(python: Path, engine: str, model: Path, args: argparse.Namespace) -> dict:
    sizes = ["--prompt-tokens", str(args.prompt_tokens), "--tokens", str(args.tokens)]
    command = [
        str(python),
        __file__,
        "--worker",
        engine,
        "--model",
        str(model),
        *sizes,
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    if args.avx2_only and engine == "ours":
        env["MIXTRAL_CHAT_NATIVE_ISA"] = "avx2"
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"error: the {engine} worker failed:\n{result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- driver -----------------------------------------------------------------------------------


def host_line() -> str:
    sys.path.insert(0, str(REPO_ROOT))
    from tests.conftest import host_line as line

    return line()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["real", "small"])
    parser.add_argument("--layers", type=int, default=2, help="layers at real widths")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=32, help="greedy decode length")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "build" / "bench_peer")
    parser.add_argument(
        "--avx2-only", action="store_true", help="both engines on AVX2 code (llama.cpp built so)"
    )
    parser.add_argument("--worker", choices=["llama", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = worker_llama if args.worker == "llama" else worker_ours
        print(json.dumps(run(args.model, args.prompt_tokens, args.tokens, args.threads)))
        return

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    llama_python = llama_venv(workdir, args.avx2_only)
    converter = llama_converter(workdir, llama_python)
    print(host_line())
    print(
        f"\nprefill {args.prompt_tokens} tokens, then greedy decode of {args.tokens}; "
        f"{args.threads} threads; {args.rounds} alternating rounds; mixtral-chat int4 g64, llama.cpp Q4_0"
        + ("; both on AVX2 code alone (--avx2-only)" if args.avx2_only else "")
        + "\n"
    )
    print("| shape | measure | llama.cpp tok/s | mixtral-chat tok/s | ratio per round | median ratio |")
    print("| --- | --- | --- | --- | --- | ---: |")
    for name in args.shapes:
        shape = dict(SHAPES[name])
        if name == "real":
            shape["num_hidden_layers"] = args.layers
        label = f"{name}-{shape['num_hidden_layers']}l"
        source = write_checkpoint(workdir / f"{label}-bf16", shape)
        ours = quantize_ours(source, workdir / f"{label}-int4")
        gguf = convert_llama(source, workdir / f"{label}-q4_0.gguf", converter, llama_python)
        results: dict[str, list[dict]] = {"llama": [], "ours": []}
        for r in range(args.rounds):
            order = ["llama", "ours"] if r % 2 == 0 else ["ours", "llama"]
            for engine in order:
                if engine == "llama":
                    results["llama"].append(run_worker(llama_python, "llama", gguf, args))
                else:
                    results["ours"].append(run_worker(Path(sys.executable), "ours", ours, args))
        for measure in ("decode_tok_s", "prefill_tok_s"):
            theirs = [x[measure] for x in results["llama"]]
            mine = [x[measure] for x in results["ours"]]
            ratios = [m / t for m, t in zip(mine, theirs, strict=True)]
            fmt = " / ".join
            print(
                f"| {label} | {measure.split('_')[0]} | {fmt(f'{t:.1f}' for t in theirs)} | "
                f"{fmt(f'{m:.1f}' for m in mine)} | {fmt(f'{q:.2f}' for q in ratios)} | "
                f"**{statistics.median(ratios):.2f}x** |"
            )


if __name__ == "__main__":
    main()
