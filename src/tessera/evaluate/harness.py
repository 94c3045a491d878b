"""lm-eval-harness adapter: `lm_eval --model tessera --model_args pretrained=DIR` for users who have lm-eval.

lm-eval is optional (not a dependency, and its datasets need a network). The adapter is a plain class with the
three methods lm-eval calls; when lm_eval is importable it is also registered as model type "tessera".
Requests are lm-eval `Instance`s or anything with an `.args` tuple.
"""

from __future__ import annotations

from tessera.evaluate.scoring import Scorer
from tessera.model import Transformer

try:  # pragma: no cover - exercised only where lm-eval is installed
    from lm_eval.api.model import LM as _Base
    from lm_eval.api.registry import register_model as _register
except ImportError:
    _Base = object

    def _register(*_names):
        return lambda cls: cls


@_register("tessera")
class TesseraLM(_Base):
    def __init__(self, pretrained: str | Transformer = "default", batch_size: int | str = 16, max_length: int = 2048,
                 **_kwargs):
        if _Base is not object:
            super().__init__()
        if isinstance(pretrained, Transformer):
            self.model = pretrained
        else:
            from tessera.checkpoint import load

            self.model = load(pretrained)
        self.scorer = Scorer(self.model, int(batch_size) if str(batch_size).isdigit() else 16)
        self.max_length = max_length

    @staticmethod
    def _args(request):
        return request.args if hasattr(request, "args") else tuple(request)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        scores = self.scorer.score_pairs([self._args(r)[:2] for r in requests])
        return [(s.loglik, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests) -> list[float]:
        from tessera.evaluate.perplexity import rolling_nll

        out = []
        for r in requests:
            ids = self.scorer.encode(self._args(r)[0])
            out.append(-rolling_nll(self.model, ids, self.max_length) if ids else 0.0)
        return out

    def generate_until(self, requests) -> list[str]:
        from tessera.generate import cut_at_stop_strings, generate

        out = []
        for r in requests:
            context, gen_kwargs = self._args(r)[:2]
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = generate(self.model, [self.scorer.encode(context)], int(gen_kwargs.get("max_gen_toks", 256)),
                           temperature=float(gen_kwargs.get("temperature", 0.0) or 0.0), stop_strings=until)[0]
            out.append(cut_at_stop_strings(self.model.tokenizer.decode(new, skip_special_tokens=True), until))
        return out
