"""The first ten bAbI tasks, generated from their definitions (Weston et al., 2015).

A sample is a dict with
  task        "qa1" ... "qa10";
  story       the sentences, each ending in '.';
  question    one sentence ending in '?';
  answer      a label; comma-separated labels for lists (qa8: "apple,football", "nothing" when empty);
  supporting  sorted indices into `story` of the facts the answer follows from.

Samples are a pure function of (task, seed, split, index), drawn from hash-derived seeds, so they are the same on
every machine and any one can be regenerated. The train and test splits never share a (story, question): a sample
belongs to the split named by one bit of the sha256 of its text, and each split keeps only its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from lm2_jax.data.babi.world import (DIRECTIONS, GIVERS, MOVE_VERBS, NUMBER_WORDS, OBJECTS, OPPOSITE, PEOPLE,
                                     PLACES, QA10_PEOPLE, QA10_PLACES, Rng, World, derive_seed)

SPLITS = ("train", "test")
MAX_ATTEMPTS = 1000

Draft = tuple[list[str], str, str, list[int]]  # story, question, answer, supporting


def qa1_single_supporting_fact(rng: Rng) -> Draft | None:
  """People move around; "Where is Mary?" The answer is in her latest move."""
  w = World(rng, PEOPLE, PLACES)
  for _ in range(rng.between(2, 10)):
    w.step(move=1)
  person = rng.choice(sorted(w.where))
  return w.story, f"Where is {person}?", w.where[person], [w.last_move[person]]


def qa2_two_supporting_facts(rng: Rng) -> Draft | None:
  """People move, pick up and drop objects; "Where is the football?" needs who had it and where they were."""
  w = World(rng, PEOPLE, PLACES, OBJECTS)
  for _ in range(rng.between(4, 16)):
    w.step(move=3, get=2, drop=1)
  placed = [o for o in OBJECTS if o in w.holder or o in w.dropped]
  if not placed:
    return None
  obj = rng.choice(placed)
  if obj in w.holder:
    person = w.holder[obj]
    place, support = w.where[person], sorted({w.got[obj], w.last_move[person]})
  else:
    place, support = w.dropped[obj]
  return w.story, f"Where is the {obj}?", place, support


def qa3_three_supporting_facts(rng: Rng) -> Draft | None:
  """"Where was the football before the kitchen?": the place an object was carried from into the kitchen.

  Asked only where one holder carried the object from that place into the kitchen (their pick-up, the fact that
  put them in the earlier place and their move to the kitchen support the answer) and the object was in the kitchen
  only once, so that "before" is unambiguous.
  """
  w = World(rng, PEOPLE, PLACES, OBJECTS)
  for _ in range(rng.between(10, 30)):
    w.step(move=4, get=2, drop=1)
  options = []
  for obj in OBJECTS:
    trail = w.trail[obj]
    visits = [place for place, _, _ in trail]
    for (before, s0, got0), (place, s1, got1) in zip(trail, trail[1:]):
      if got0 == got1 and visits.count(place) == 1:
        options.append((obj, place, before, sorted(set(s0) | set(s1))))
  if not options:
    return None
  obj, place, before, support = rng.choice(options)
  return w.story, f"Where was the {obj} before the {place}?", before, support


def qa4_two_arg_relations(rng: Rng) -> Draft | None:
  """Two facts place two rooms next to a third; "What is north of the kitchen?" / "What is the kitchen north of?"."""
  center, *others = rng.sample(PLACES, 3)
  facts = []  # (a, direction, b): a is `direction` of b
  for other, direction in zip(others, rng.sample(DIRECTIONS, 2)):
    facts.append((other, direction, center) if rng.chance(0.5) else (center, OPPOSITE[direction], other))
  order = rng.shuffled(range(2))
  story = [f"The {a} is {d} of the {b}." for a, d, b in (facts[i] for i in order)]
  k = rng.below(2)
  a, d, b = facts[order[k]]
  if rng.chance(0.5):  # the same relation seen from the other side
    a, d, b = b, OPPOSITE[d], a
  if rng.chance(0.5):
    return story, f"What is {d} of the {b}?", a, [k]
  return story, f"What is the {a} {d} of?", b, [k]


def qa5_three_arg_relations(rng: Rng) -> Draft | None:
  """People hand objects to each other; questions about a giving that the story tells exactly once."""
  w = World(rng, GIVERS, PLACES, OBJECTS)
  for _ in range(rng.between(6, 20)):
    w.step(move=2, meet=3, get=2, drop=0.5, give=5)
  gives = w.gives
  if not gives:
    return None

  def unique(**known: str) -> bool:
    fields = {"giver": 1, "obj": 2, "receiver": 3}
    return sum(all(g[fields[k]] == v for k, v in known.items()) for g in gives) == 1

  i, giver, obj, receiver = gives[-1] if rng.chance(0.5) else rng.choice(gives)
  forms = [(f"Who gave the {obj} to {receiver}?", giver, unique(obj=obj, receiver=receiver)),
           (f"What did {giver} give to {receiver}?", obj, unique(giver=giver, receiver=receiver)),
           (f"Who received the {obj}?", receiver, unique(obj=obj)),
           (f"Who did {giver} give the {obj} to?", receiver, unique(giver=giver, obj=obj)),
           (f"Who gave the {obj}?", giver, unique(obj=obj))]
  forms = [(q, a) for q, a, ok in forms if ok]
  if not forms:
    return None
  question, answer = rng.choice(forms)
  return w.story, question, answer, [i]


def qa6_yes_no(rng: Rng) -> Draft | None:
  """"Is John in the kitchen?" after people move (and handle objects, which does not matter)."""
  w = World(rng, PEOPLE, PLACES, OBJECTS)
  for _ in range(rng.between(2, 12)):
    w.step(move=3, get=1, drop=1)
  if not w.where:
    return None
  person = rng.choice(sorted(w.where))
  here = w.where[person]
  place = here if rng.chance(0.5) else rng.choice([p for p in PLACES if p != here])
  return w.story, f"Is {person} in the {place}?", "yes" if place == here else "no", [w.last_move[person]]


def _holdings(rng: Rng) -> tuple[World, str, list[int]] | None:
  """A story of moving, getting, dropping and giving; a person who has held something, and the supporting facts
  of what they hold now: their latest acquisition of each object they ever held and the release after it, if any."""
  w = World(rng, PEOPLE, PLACES, OBJECTS)
  for _ in range(rng.between(4, 14)):
    w.step(move=2, meet=1, get=3, drop=2, give=2)
  people = sorted({p for p, _ in w.acquired})
  if not people:
    return None
  holding = sorted(set(w.holder.values()))
  person = rng.choice(holding if holding and rng.chance(0.7) else people)
  support = sorted({i for (p, o), i in w.acquired.items() if p == person}
                   | {i for (p, o), i in w.released.items() if p == person})
  return w, person, support


def qa7_counting(rng: Rng) -> Draft | None:
  """"How many objects is Mary carrying?" answered with a number word ("none" ... "three")."""
  drawn = _holdings(rng)
  if drawn is None:
    return None
  w, person, support = drawn
  return w.story, f"How many objects is {person} carrying?", NUMBER_WORDS[len(w.carrying(person))], support


def qa8_lists_sets(rng: Rng) -> Draft | None:
  """"What is Daniel carrying?" answered with the objects in the order he got them, or "nothing"."""
  drawn = _holdings(rng)
  if drawn is None:
    return None
  w, person, support = drawn
  return w.story, f"What is {person} carrying?", ",".join(w.carrying(person)) or "nothing", support


def qa9_simple_negation(rng: Rng) -> Draft | None:
  """Facts "John is in the kitchen." / "John is not in the kitchen." and moves; "Is John in the kitchen?"."""
  story, last = [], {}  # person -> (index, place, is there)
  for _ in range(rng.between(2, 10)):
    person = rng.choice(PEOPLE)
    known = last.get(person)
    if rng.chance(0.4):
      leaves = known is not None and known[2] and rng.chance(0.6)
      place = known[1] if leaves else rng.choice(PLACES)
      story.append(f"{person} is {rng.choice(('not', 'no longer')) if leaves else 'not'} in the {place}.")
      last[person] = (len(story) - 1, place, False)
    else:
      place = rng.choice(PLACES)
      verb = rng.choice(("is in",) + MOVE_VERBS)
      story.append(f"{person} {verb} the {place}.")
      last[person] = (len(story) - 1, place, True)
  person = rng.choice(sorted(last))
  i, place, there = last[person]
  if there and rng.chance(0.2):  # (yes and no come out about equally often)
    place = rng.choice([p for p in PLACES if p != place])
    return story, f"Is {person} in the {place}?", "no", [i]
  return story, f"Is {person} in the {place}?", "yes" if there else "no", [i]


def qa10_indefinite_knowledge(rng: Rng) -> Draft | None:
  """Facts "Julie is either in the school or the cinema." and definite ones; "Is Julie in the school?" is
  yes, no or maybe."""
  story, last = [], {}  # person -> (index, places she may be in)
  for _ in range(rng.between(2, 10)):
    person = rng.choice(QA10_PEOPLE)
    if rng.chance(0.5):
      a, b = rng.sample(QA10_PLACES, 2)
      story.append(f"{person} is either in the {a} or the {b}.")
      last[person] = (len(story) - 1, (a, b))
    else:
      place = rng.choice(QA10_PLACES)
      story.append(f"{person} {rng.choice(('is in',) + MOVE_VERBS)} the {place}.")
      last[person] = (len(story) - 1, (place,))
  person = rng.choice(sorted(last))
  i, maybe_in = last[person]
  if rng.chance(2 / 3):  # (yes, no and maybe come out about equally often)
    place, answer = rng.choice(maybe_in), "yes" if len(maybe_in) == 1 else "maybe"
  else:
    place, answer = rng.choice([p for p in QA10_PLACES if p not in maybe_in]), "no"
  return story, f"Is {person} in the {place}?", answer, [i]


TASKS: dict[str, Callable[[Rng], Draft | None]] = {
    "qa1": qa1_single_supporting_fact,
    "qa2": qa2_two_supporting_facts,
    "qa3": qa3_three_supporting_facts,
    "qa4": qa4_two_arg_relations,
    "qa5": qa5_three_arg_relations,
    "qa6": qa6_yes_no,
    "qa7": qa7_counting,
    "qa8": qa8_lists_sets,
    "qa9": qa9_simple_negation,
    "qa10": qa10_indefinite_knowledge,
}

_PLACE_LABELS = tuple(sorted(PLACES))
TASK_LABELS: dict[str, tuple[str, ...]] = {
    "qa1": _PLACE_LABELS,
    "qa2": _PLACE_LABELS,
    "qa3": _PLACE_LABELS,
    "qa4": _PLACE_LABELS,
    "qa5": tuple(sorted(GIVERS) + sorted(OBJECTS)),
    "qa6": ("no", "yes"),
    "qa7": NUMBER_WORDS,
    "qa8": tuple(sorted(OBJECTS)) + ("nothing",),
    "qa9": ("no", "yes"),
    "qa10": ("maybe", "no", "yes"),
}
"""The answer vocabulary of each task: what the BABILong metric looks for in a model's output."""

TASK_ENTITIES: dict[str, tuple[str, ...]] = {
    **{t: PEOPLE + PLACES + OBJECTS for t in ("qa1", "qa2", "qa3", "qa6", "qa7", "qa8", "qa9")},
    "qa4": PLACES,
    "qa5": GIVERS + PLACES + OBJECTS,
    "qa10": QA10_PEOPLE + QA10_PLACES,
}
"""The people, places and objects each task's stories speak of (distractor text should not mention them)."""


def check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f"task={task!r}: unknown bAbI task; use one of {', '.join(TASKS)}")


def split_of(task: str, story: list[str], question: str) -> str:
  """The split a (story, question) belongs to: one bit of the sha256 of its text."""
  text = "\n".join([task, *story, question])
  return SPLITS[hashlib.sha256(text.encode()).digest()[0] & 1]


def sample(task: str, seed: int, split: str, index: int) -> dict:
  """Sample `index` of `task`'s `split` for `seed`: a pure function of its arguments."""
  check_task(task)
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: use 'train' or 'test'")
  for name, value in (("seed", seed), ("index", index)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise ValueError(f"{name}={value!r}: must be a non-negative integer")
  for attempt in range(MAX_ATTEMPTS):
    rng = Rng(derive_seed("babi", task, seed, split, index, attempt))
    draft = TASKS[task](rng)
    if draft is not None and split_of(task, draft[0], draft[1]) == split:
      story, question, answer, supporting = draft
      return {"task": task, "story": list(story), "question": question, "answer": answer,
              "supporting": sorted(supporting)}
  raise RuntimeError(f"bAbI {task}: no {split} sample for seed={seed} index={index} in {MAX_ATTEMPTS} attempts")


def generate(task: str, num_samples: int, seed: int = 0, split: str = "train") -> list[dict]:
  """`num_samples` samples of bAbI `task` ("qa1" ... "qa10") for `split` ("train" or "test")."""
  if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 0:
    raise ValueError(f"num_samples={num_samples!r}: must be a non-negative integer")
  return [sample(task, seed, split, i) for i in range(num_samples)]
