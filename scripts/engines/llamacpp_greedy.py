"""Greedy tokens (and timings) from llama.cpp for a GGUF file. Runs in .venv-llamacpp (llama-cpp-python).

    .venv-llamacpp/bin/python scripts/engines/llamacpp_greedy.py MODEL.gguf REQUEST.json

REQUEST: {"prompts": [[token ids], ...], "max_tokens": N, "texts": [str, ...] (optional: tokenized by llama.cpp
too), "threads": T, "bench": {"prompt_len": P, "decode_tokens": D} (optional)}.
Prints one JSON line: {"tokens": [[...], ...], "tokenized": [[...], ...], "bench": {"prefill_tok_s",
"decode_tok_s"}}. Greedy (argmax of the logits), EOS not special, so every row has exactly N tokens.

The token check runs llama.cpp in float32 end to end: the GGUF is f32, and so is the KV cache (`type_k`/`type_v`
GGML_TYPE_F32, flash attention off; llama.cpp's defaults are an f16 cache, and its CPU flash-attention kernel
rounds K/V to f16 even then). With the f16 cache, the Minitron child's logits move by up to 0.7 from the second
position on (0.02 for the parent) and its greedy tokens part from tessera's at the second token; with the f32
cache they agree within 1e-3 of tessera's float64 logits. The speed run (`bench`) keeps llama.cpp's defaults, as a
server would run.
"""

import json
import sys
import time


def greedy(llm, prompt: list[int], n: int) -> list[int]:
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def main() -> None:
    model_file, request_file = sys.argv[1], sys.argv[2]
    req = json.loads(open(request_file).read())
    from llama_cpp import GGML_TYPE_F32, Llama

    threads = req.get("threads", 2)

    def load(logits_all: bool, **cache):
        return Llama(model_path=model_file, n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512,
                     logits_all=logits_all, verbose=False, seed=0, **cache)

    llm = load(True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False)  # keeps every position's logits in llm.scores (the greedy loop reads the last one)
    result = {"tokens": [greedy(llm, p, req["max_tokens"]) for p in req["prompts"]],
              "tokenized": [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in req.get("texts", [])]}
    bench = req.get("bench")
    if bench:
        del llm
        llm = load(False)  # as a server runs: logits of the last position only
        prompt = [req["prompts"][0][i % len(req["prompts"][0])] for i in range(bench["prompt_len"])]
        llm.reset()
        llm.eval(prompt)  # warm-up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - t0
        llm.reset()
        llm.eval(prompt[:8])
        t0 = time.perf_counter()
        token = prompt[8]
        for _ in range(bench["decode_tokens"]):
            llm.eval([token])
        decode = time.perf_counter() - t0
        result["bench"] = {"prefill_tok_s": bench["prompt_len"] / prefill, "decode_tok_s": bench["decode_tokens"] / decode}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
