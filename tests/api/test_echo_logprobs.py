"""`echo` with `logprobs` on /v1/completions scores the prompt: each prompt
token after the first has its log-probability and top alternatives, equal to
what a generation from the shorter prompt saw."""
import math

from conftest import SMOL, TINY


def test_echo_logprobs_score_the_prompt(oai):
    g = oai.completions.create(model=TINY, prompt=[1, 5, 9], max_tokens=2, logprobs=2, temperature=0)
    ids = g.choices[0].model_extra["token_ids"]
    r = oai.completions.create(model=TINY, prompt=[1, 5, 9] + ids, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    for k in range(2):
        assert math.isclose(lp.token_logprobs[3 + k], g.choices[0].logprobs.token_logprobs[k], abs_tol=1e-3)
        assert set(lp.top_logprobs[3 + k]) == set(g.choices[0].logprobs.top_logprobs[k])


def test_echo_logprobs_text_prompt(oai):
    # A likely continuation scores higher than an unlikely one.
    a = oai.completions.create(model=SMOL, prompt="The capital of France is Paris", max_tokens=0, echo=True, logprobs=1)
    b = oai.completions.create(model=SMOL, prompt="The capital of France is banana", max_tokens=0, echo=True, logprobs=1)
    la, lb = a.choices[0].logprobs, b.choices[0].logprobs
    assert "".join(la.tokens) == a.choices[0].text
    assert la.token_logprobs[-1] > lb.token_logprobs[-1]
