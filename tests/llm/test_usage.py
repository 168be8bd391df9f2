"""`Usage`: tokens and cost that add up, with an unknown cost kept apart from zero."""

from memcity_pipeline.llm.usage import Usage, add_costs, total


def test_usages_add_and_an_unknown_cost_stays_unknown_only_when_all_are() -> None:
    a = Usage(10, 5, None, 1)
    b = Usage(3, 2, 0.25, 1)
    assert a + b == Usage(13, 7, 0.25, 2)
    assert (a + a).cost_usd is None
    assert total([a, b, b]).cost_usd == 0.5
    assert total([]) == Usage()
    assert add_costs(None, None) is None and add_costs(0.0, None) == 0.0


def test_the_difference_of_two_readings_is_the_spend_between_them() -> None:
    before, after = Usage(10, 5, None, 2), Usage(30, 9, 0.5, 5)
    assert after - before == Usage(20, 4, 0.5, 3)
    assert (Usage(1, 1, None, 1) - Usage()).cost_usd is None


def test_a_batch_call_is_shared_by_its_items_and_round_trips_through_the_columns() -> None:
    share = Usage(100, 11, 0.3, 1).share(4)
    assert (share.prompt_tokens, share.completion_tokens, share.calls) == (25, 3, 0.25)
    assert share.cost_usd is not None and abs(share.cost_usd - 0.075) < 1e-12
    assert Usage.of_columns(share.as_columns()) == share
    assert Usage(7, 1).total_tokens == 8
