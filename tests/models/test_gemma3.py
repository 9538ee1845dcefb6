"""Real Gemma-3-270M (optional preset): slow."""

import pytest

from qkcov.models.verify import verify_parity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    from qkcov.models.loading import load_model

    try:
        return load_model("gemma3-270m")
    except ValueError as err:
        pytest.skip(str(err))


def test_gemma3_parity(gemma):
    long_prompt = " ".join(f"word{i}" for i in range(40))
    result = verify_parity(
        gemma, prompts=[long_prompt, "Short prompt.", "The key is in Box C. Box"]
    )
    assert result["passed"], result
    assert (result["n_layers"], result["n_heads"], result["n_kv_heads"]) == (18, 4, 1)
