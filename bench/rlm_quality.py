"""RLM quality on synthetic long-context tasks: the RLM against the same model given the
context directly.

    python bench/rlm_quality.py [--tasks needle,aggregation,pairs] [--sizes 8k,64k,1m]
        [--trials 1] [--seed 7] [--max-iterations 8] [--max-timeout 240] [--max-budget USD]
        [--home DIR] [--show TASK:SIZE]

The model is the configured one (`MEMCITY_LLM_BASE_URL` or `OPENROUTER_API_KEY`,
`MEMCITY_LLM_MODEL`, `MEMCITY_LLM_SUB_MODEL`), else the embedded SmolLM2-135M, whose figures are
low: it proves the harness, not the method. Tasks are made here from a seed (no download), at
each size in characters:

- `needle`: one sentence, "The special magic number for <city> is <7 digits>.", at a random
  depth of filler prose; scored 1 when the answer holds the number.
- `aggregation` (as OOLONG's): one question per line, `Date: ... || User: ... || Instance:
  <question>`, each of one of six TREC-like classes (abbreviation, description, entity, human,
  location, numeric) that the line does not name; the task is the count per class, scored as the
  mean over classes of `0.75 ** |answer - truth|` (0 for a class the answer lacks).
- `pairs` (as OOLONG-Pairs'): one user per line (city, job, sport, in varied phrasing); the task
  lists every pair of users who share all three; scored by F1 over unordered pairs.

Each task runs twice: as an RLM query (`memcity_pipeline.api.rlm_query`, the text as a `custom`
context, sub-call cache off) and as one direct call of the same model with the question after the
context cut to the model's window (`MEMCITY_LLM_CONTEXT_WINDOW` tokens at `--chars-per-token`,
less room for the question and the answer; cut shorter if the server still refuses it). The
table gives, per task, size and method, the mean score, the RLM's statuses, cost (n/a when the
provider reports none), tokens and latency. What is kept: each RLM session as a row of the
lake's `rlm_sessions` (org `rlm-quality`) with its trajectory (`memcity sessions --org
rlm-quality`, `memcity sessions --trajectory ID`), and every run of both methods as a line of
`<home>/rlm_quality/results.jsonl`.
"""

import argparse
import json
import os
import random
import re
import statistics
import string
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ORG = "rlm-quality"
TASKS = ("needle", "aggregation", "pairs")
ANSWER_TOKENS = 512

# ---------------------------------------------------------------------------------- word lists


def words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


CITIES = words(
    "Lisbon Oslo Quito Hanoi Dakar Lima Perth Tunis Riga Accra Bergen Cusco Davao Izmir Kyoto "
    "Lagos Lyon Malmo Nantes Porto Recife Sapporo Tartu Tbilisi Turin Utrecht Valencia Vilnius "
    "Windhoek Zagreb Aarhus Bilbao Cordoba Debrecen Esbjerg Fukuoka Galway Hobart Innsbruck "
    "Jaipur"
)
JOBS = words(
    "baker carpenter nurse pilot chemist tailor librarian plumber surveyor translator welder "
    "architect beekeeper cartographer dentist editor farmer geologist jeweller locksmith "
    "mechanic midwife optician painter pharmacist potter sailor sculptor teacher vintner "
    "zoologist barber brewer butcher chef cobbler courier florist glazier"
)
SPORTS = words(
    "chess tennis rowing fencing judo curling archery badminton cricket cycling diving golf "
    "handball hockey karate lacrosse netball polo rugby sailing skiing squash surfing swimming "
    "volleyball wrestling bowling boxing climbing darts"
)
NOUNS = words(
    "harbour lantern orchard river ledger window engine garden bridge market letter compass "
    "meadow kettle ladder quarry signal tower valley violin wagon workshop archive barrel canal "
    "chimney clock ferry granary hedge island journal mill pasture"
)
ADJECTIVES = words(
    "old quiet narrow bright heavy distant careful patient small broad steady weathered hidden "
    "ordinary northern gentle busy empty"
)
VERBS = words(
    "crosses faces follows guards joins marks passes reaches shelters supplies watches borders "
    "feeds frames lights"
)
PLACES = (
    "at dawn",
    "after the rain",
    "in the long evenings",
    "before the market opens",
    "during the winter",
    "on most Sundays",
    "when the tide turns",
    "by the old road",
    "near the square",
    "under the hill",
)

LABELS: dict[str, tuple[str, ...]] = {
    "abbreviation": (
        "What does {abbr} stand for?",
        "What is the full form of the abbreviation {abbr}?",
        "Which words make up the acronym {abbr}?",
    ),
    "description": (
        "Why does a {noun} need regular care?",
        "How does a {noun} work?",
        "What is the purpose of a {adj} {noun}?",
    ),
    "entity": (
        "What tool does a {job} use most?",
        "Which animal lives near the {noun}?",
        "What kind of plant grows by the {adj} {noun}?",
    ),
    "human": (
        "Who built the first {noun} in {city}?",
        "Which {job} became famous in {city}?",
        "Who was the most famous {job} of the century?",
    ),
    "location": (
        "Where is the oldest {noun} in {city}?",
        "In which country is {city}?",
        "Where do most {job}s in {city} live?",
    ),
    "numeric": (
        "How many {noun}s are there in {city}?",
        "In what year did {city} get its first {noun}?",
        "How far is {city} from the nearest {noun}?",
    ),
}
PAIR_PHRASES = (
    "User {uid} lives in {city}, works as a {job} and plays {sport}.",
    "{uid} is a {job} from {city} who enjoys {sport}.",
    "{sport} is the sport of {uid}, a {job} living in {city}.",
    "In {city}, {uid} earns a living as a {job}; on weekends, {sport}.",
)


# ---------------------------------------------------------------------------------- the tasks


@dataclass(frozen=True)
class Task:
    """One generated task: the context, the question, the truth and how an answer scores."""

    name: str
    size: int
    seed: int
    context: str
    question: str
    truth: Any
    score: Callable[[str], float]


def prose(rng: random.Random, chars: int) -> str:
    """Filler sentences of about `chars` characters (no city, no digit)."""
    sentences: list[str] = []
    total = 0
    while total < chars:
        s = (
            f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the "
            f"{rng.choice(NOUNS)} {rng.choice(PLACES)}."
        )
        sentences.append(s)
        total += len(s) + 1
    return " ".join(sentences)[:chars]


def needle_task(size: int, seed: int) -> Task:
    rng = random.Random(f"needle/{size}/{seed}")
    city = rng.choice(CITIES)
    number = rng.randint(1_000_000, 9_999_999)
    needle = f"The special magic number for {city} is {number}."
    haystack = prose(rng, max(0, size - len(needle) - 1))
    cut = haystack.find(". ", rng.randint(0, max(0, len(haystack) - 1)))
    at = len(haystack) if cut < 0 else cut + 2
    context = f"{haystack[:at]}{needle} {haystack[at:]}".strip()
    question = (
        f"What is the special magic number for {city} mentioned in the context? "
        "Answer with the number only."
    )

    def score(answer: str) -> float:
        return 1.0 if str(number) in re.sub(r"[\s,.]", "", answer or "") else 0.0

    return Task("needle", size, seed, context, question, number, score)


def _question(rng: random.Random, label: str) -> str:
    abbr = "".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(2, 4)))
    return rng.choice(LABELS[label]).format(
        abbr=abbr,
        noun=rng.choice(NOUNS),
        adj=rng.choice(ADJECTIVES),
        job=rng.choice(JOBS),
        city=rng.choice(CITIES),
    )


def aggregation_task(size: int, seed: int) -> Task:
    rng = random.Random(f"aggregation/{size}/{seed}")
    labels = sorted(LABELS)
    weights = [rng.uniform(0.5, 3.0) for _ in labels]
    counts = dict.fromkeys(labels, 0)
    lines: list[str] = []
    day = date(2024, 1, 1)
    total = 0
    while True:
        label = rng.choices(labels, weights)[0]
        when = day + timedelta(days=rng.randint(0, 700))
        line = (
            f"Date: {when:%b %d, %Y} || User: {rng.randint(10_000, 99_999)} || "
            f"Instance: {_question(rng, label)}"
        )
        if total + len(line) + 1 > size and lines:
            break
        lines.append(line)
        counts[label] += 1
        total += len(line) + 1
    example = ", ".join(f'"{label}": 0' for label in labels)
    question = (
        "Each line of the context is a question that a user asked. Classify every question "
        f"into exactly one of these categories: {', '.join(labels)} (abbreviation: asks what an "
        "abbreviation means; description: asks for a description, reason or manner; entity: "
        "asks for a thing, animal, plant or tool; human: asks for a person or group; location: "
        "asks for a place; numeric: asks for a number, date or distance). How many questions "
        "fall into each category? Answer with one JSON object mapping every category to its "
        f"count, such as {{{example}}}."
    )

    def score(answer: str) -> float:
        given = _json_object(answer)
        total_score = 0.0
        for label in labels:
            value = given.get(label)
            if isinstance(value, int | float) and not isinstance(value, bool):
                total_score += 0.75 ** abs(float(value) - counts[label])
        return total_score / len(labels)

    return Task("aggregation", size, seed, "\n".join(lines), question, counts, score)


def _json_object(answer: str) -> dict[str, Any]:
    """The last JSON object in an answer (a dict of lower-cased keys), else empty."""
    for match in reversed(list(re.finditer(r"\{[^{}]*\}", answer or ""))):
        try:
            value = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return {str(k).strip().lower(): v for k, v in value.items()}
    return {}


def pairs_task(size: int, seed: int) -> Task:
    rng = random.Random(f"pairs/{size}/{seed}")
    combos = iter(rng.sample([(c, j, s) for c in CITIES for j in JOBS for s in SPORTS], 40_000))
    ids = iter(f"U{n}" for n in rng.sample(range(10_000, 100_000), 40_000))
    users: list[tuple[str, tuple[str, str, str], str]] = []  # id, combo, phrase
    total = 0
    while total < size or len(users) < 4:
        user = (next(ids), next(combos), rng.choice(PAIR_PHRASES))
        users.append(user)
        total += len(_pair_line(*user)) + 1
    # About one pair in 40 users: a user takes another's city, job and sport (each once).
    planted = max(2, len(users) // 40)
    chosen = rng.sample(range(len(users)), 2 * planted)
    for source, target in zip(chosen[:planted], chosen[planted:], strict=True):
        uid, _, phrase = users[target]
        users[target] = (uid, users[source][1], phrase)
    by_combo: dict[tuple[str, str, str], list[str]] = {}
    for uid, combo, _ in users:
        by_combo.setdefault(combo, []).append(uid)
    truth = {frozenset(u) for u in by_combo.values() if len(u) == 2}
    context = "\n".join(_pair_line(*user) for user in users)
    question = (
        "Each line of the context describes one user (their id looks like U12345). List every "
        "pair of users who live in the same city, have the same job and play the same sport. "
        "Answer with one pair per line, written as `U12345, U67890`, and nothing else."
    )

    def score(answer: str) -> float:
        given = {
            frozenset(pair)
            for pair in re.findall(r"(U\d{5})\W{1,6}(U\d{5})", answer or "")
            if pair[0] != pair[1]
        }
        if not given and not truth:
            return 1.0
        hits = len(given & truth)
        if not hits:
            return 0.0
        precision, recall = hits / len(given), hits / len(truth)
        return 2 * precision * recall / (precision + recall)

    return Task("pairs", size, seed, context, question, sorted(sorted(p) for p in truth), score)


def _pair_line(uid: str, combo: tuple[str, str, str], phrase: str) -> str:
    city, job, sport = combo
    return phrase.format(uid=uid, city=city, job=job, sport=sport)


MAKERS: dict[str, Callable[[int, int], Task]] = {
    "needle": needle_task,
    "aggregation": aggregation_task,
    "pairs": pairs_task,
}


# ---------------------------------------------------------------------------------- the runs


def parse_size(text: str) -> int:
    """`8k`, `64K`, `1m`, `250000` -> characters."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (such as 8k, 64k, 1m)")
    scale = {"": 1, "k": 1_000, "m": 1_000_000}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def show_size(chars: int) -> str:
    if chars >= 1_000_000 and chars % 1_000_000 == 0:
        return f"{chars // 1_000_000}M"
    return f"{chars // 1000}k" if chars % 1000 == 0 else str(chars)


@dataclass
class Run:
    """One method on one task."""

    task: str
    size: int
    seed: int
    method: str  # rlm | direct
    score: float
    answer: str
    latency_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    status: str = "completed"
    warning: str | None = None
    error: str | None = None
    session_id: str | None = None
    given_chars: int = 0
    iterations: int = 0
    sub_calls: int = 0


def finished(task: Task, method: str, answer: str, started: float, **figures: Any) -> Run:
    """The run of `method` on `task` that began at `started` (perf_counter), its answer scored."""
    return Run(
        task=task.name,
        size=task.size,
        seed=task.seed,
        method=method,
        score=task.score(answer),
        answer=answer,
        latency_s=time.perf_counter() - started,
        **figures,
    )


def run_rlm(task: Task, client: Any, sandbox: Any, store: Any, args: argparse.Namespace) -> Run:
    from memcity_pipeline.api import rlm_query

    config: dict[str, Any] = {
        "max_iterations": args.max_iterations,
        "max_timeout": args.max_timeout,
        "max_tokens_per_call": ANSWER_TOKENS * 2,
        "cache_sub_calls": False,
    }
    if args.max_budget is not None:
        config["max_budget"] = args.max_budget
    started = time.perf_counter()
    result = rlm_query(
        ORG,
        task.question,
        "custom",
        custom_context=task.context,
        rlm_config=config,
        llm=client,
        sandbox=sandbox,
        session_store=store,
    )
    return finished(
        task,
        "rlm",
        result.answer,
        started,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        cost_usd=result.cost,
        status=result.status,
        warning=result.warning,
        error=result.error,
        session_id=result.session_id,
        given_chars=len(task.context),
        iterations=result.iterations,
        sub_calls=result.total_sub_calls,
    )


def run_direct(task: Task, client: Any, window_tokens: int, chars_per_token: float) -> Run:
    """The question after as much of the context as the window holds (cut shorter while the
    server refuses the prompt as too long)."""
    from memcity_pipeline.llm.client import LLMError

    room = window_tokens - ANSWER_TOKENS - len(task.question) / chars_per_token - 64
    budget = max(0, int(room * chars_per_token))
    started = time.perf_counter()
    error = None
    for _ in range(4):
        given = task.context[:budget]
        note = (
            ""
            if len(given) == len(task.context)
            else f"\n[the context is cut here: {len(task.context) - len(given):,} more characters]"
        )
        prompt = f"Context:\n{given}{note}\n\nQuestion: {task.question}"
        try:
            result = client.complete(
                [{"role": "user", "content": prompt}], max_tokens=ANSWER_TOKENS, use_cache=False
            )
        except LLMError as exc:
            error = str(exc)
            if not re.search(r"context|token|too long|length|exceed", error, re.IGNORECASE):
                break
            budget = int(budget * 0.7)  # the window was fuller than the estimate
            continue
        return finished(
            task,
            "direct",
            result.text,
            started,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            cost_usd=result.cost_usd,
            given_chars=len(given),
        )
    return finished(task, "direct", "", started, status="failed", error=error, given_chars=budget)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def _cost(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{sum(known) / len(values):.4f}" if known else "n/a"


def print_table(runs: list[Run]) -> None:
    """Mean score, statuses, cost, tokens and latency per task, size and method."""
    print(
        f"\n{'task':<12} {'size':>6} {'method':<7} {'n':>2} {'score':>6} "
        f"{'done/part/time/fail':>19} {'USD/run':>8} {'tokens/run':>10} {'p50 s':>7} "
        f"{'given chars':>12}"
    )
    keys = sorted({(r.task, r.size, r.method) for r in runs}, key=lambda k: (k[0], k[1], k[2]))
    for task, size, method in keys:
        rows = [r for r in runs if (r.task, r.size, r.method) == (task, size, method)]
        statuses = "/".join(
            str(sum(r.status == s for r in rows))
            for s in ("completed", "partial", "timeout", "failed")
        )
        tokens = _mean([r.prompt_tokens + r.completion_tokens for r in rows])
        print(
            f"{task:<12} {show_size(size):>6} {method:<7} {len(rows):>2} "
            f"{_mean([r.score for r in rows]):>6.3f} {statuses:>19} "
            f"{_cost([r.cost_usd for r in rows]):>8} {tokens:>10,.0f} "
            f"{statistics.median(r.latency_s for r in rows):>7.1f} "
            f"{_mean([r.given_chars for r in rows]):>12,.0f}"
        )
    print()
    for method in ("rlm", "direct"):
        rows = [r for r in runs if r.method == method]
        if rows:
            print(
                f"{method:<7} mean score {_mean([r.score for r in rows]):.3f} over {len(rows)} "
                f"runs · {_cost([r.cost_usd for r in rows])} USD a run · latency p50 "
                f"{statistics.median(r.latency_s for r in rows):.1f} s"
            )


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--sizes", default="8k,64k,1m")
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-iterations", type=int, default=8)
    parser.add_argument("--max-timeout", type=float, default=240.0)
    parser.add_argument("--max-budget", type=float, default=None)
    parser.add_argument("--chars-per-token", type=float, default=4.0)
    parser.add_argument("--methods", default="rlm,direct")
    parser.add_argument("--home", type=Path, default=None, help="MEMCITY_HOME (lake, sessions)")
    parser.add_argument("--show", default=None, help="TASK:SIZE: print that task and stop")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(MAKERS))
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    if args.show:
        name, _, size = args.show.partition(":")
        task = MAKERS[name](parse_size(size or "8k"), args.seed)
        print(f"{task.context[:2000]}\n…\n\nQUESTION: {task.question}\nTRUTH: {task.truth}")
        return []

    if args.home is not None:
        os.environ["MEMCITY_HOME"] = str(args.home)
        os.environ.pop("MEMCITY_LAKE_URI", None)
    from memcity_pipeline.settings import build_resources, get_settings

    settings = get_settings()
    resources = build_resources(settings)
    llm, sandbox = resources["llm"], resources["sandbox"]
    client = llm.get_client()
    backend = sandbox.get_backend()
    store = resources["sessions"].get_store()
    out = settings.home.resolve() / "rlm_quality" / "results.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"model {client.model} (sub-calls {client.sub_model}) · window "
        f"{settings.llm_context_window:,} tokens · sandbox {backend.name} · tasks "
        f"{', '.join(tasks)} at {', '.join(show_size(s) for s in sizes)} · {args.trials} "
        f"trial(s) from seed {args.seed}",
        flush=True,
    )
    runs: list[Run] = []
    try:
        for name in tasks:
            for size in sizes:
                for trial in range(args.trials):
                    task = MAKERS[name](size, args.seed + trial)
                    for method in methods:
                        run = (
                            run_rlm(task, client, backend, store, args)
                            if method == "rlm"
                            else run_direct(
                                task, client, settings.llm_context_window, args.chars_per_token
                            )
                        )
                        runs.append(run)
                        record = {
                            **run.__dict__,
                            "answer": run.answer[:2000],
                            "truth": task.truth,
                            "model": client.model,
                            "at": datetime.now(UTC).isoformat(),
                        }
                        with out.open("a", encoding="utf-8") as f:
                            f.write(json.dumps(record, default=str) + "\n")
                        print(
                            f"  {name} {show_size(size)} #{trial} {method}: score "
                            f"{run.score:.3f}, {run.status}, {run.latency_s:.1f} s"
                            + (f", session {run.session_id}" if run.session_id else ""),
                            flush=True,
                        )
    finally:
        sandbox.close()
        llm.close()
    print_table(runs)
    print(
        f"\nkept: {out} (every run) · the RLM sessions in the lake at {settings.lake} "
        f"(`memcity sessions --org {ORG}`, `memcity sessions --trajectory ID`)"
    )
    return runs


if __name__ == "__main__":
    main()
