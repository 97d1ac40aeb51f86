"""The bAbI world: people, places and objects, the sentences that tell what happens, and seeded randomness.

A `World` simulates people who move between places and pick up, drop and give objects. Every action it takes
appends one sentence to its story and updates what a careful reader knows: where each person is, who holds which
object, where dropped objects lie, and which sentences established each of those facts (the supporting facts of a
question about them).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

PEOPLE = ("Mary", "John", "Sandra", "Daniel")
PLACES = ("kitchen", "garden", "office", "bathroom", "hallway", "bedroom")
OBJECTS = ("apple", "football", "milk")
GIVERS = ("Fred", "Bill", "Jeff", "Mary")  # qa5
QA10_PEOPLE = ("Julie", "Bill", "Fred", "Mary")
QA10_PLACES = ("school", "cinema", "park", "office", "kitchen", "bedroom")
DIRECTIONS = ("north", "south", "east", "west")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
NUMBER_WORDS = ("none", "one", "two", "three")

MOVE_VERBS = ("moved to", "went to", "journeyed to", "travelled to", "went back to", "walked to")
GET_VERBS = ("picked up", "got", "grabbed", "took")
DROP_VERBS = ("dropped", "put down", "discarded", "left")
GIVE_VERBS = ("gave", "handed", "passed")


def derive_seed(*parts: object) -> int:
  """A 64-bit seed from the parts' text (sha256, so the same on every machine and Python version)."""
  text = "\x1f".join(str(p) for p in parts)
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


class Rng:
  """Seeded choices built only on `random.Random.random()`, the one stream Python promises never to change.

  (`randint`, `choice` and `shuffle` may change between Python versions; these helpers do not.)
  """

  def __init__(self, seed: int):
    self._random = random.Random(seed)

  def uniform(self) -> float:
    return self._random.random()

  def below(self, n: int) -> int:
    """An integer in [0, n)."""
    if n <= 0:
      raise ValueError(f"Rng.below(n={n}): n must be positive")
    return min(int(self._random.random() * n), n - 1)

  def between(self, lo: int, hi: int) -> int:
    """An integer in [lo, hi], both ends included."""
    return lo + self.below(hi - lo + 1)

  def chance(self, p: float) -> bool:
    return self._random.random() < p

  def choice(self, items: Sequence[T]) -> T:
    return items[self.below(len(items))]

  def weighted(self, items: Sequence[T], weights: Sequence[float]) -> T:
    """One item, picked with probability proportional to its weight."""
    x = self._random.random() * sum(weights)
    for item, w in zip(items, weights):
      x -= w
      if x < 0:
        return item
    return items[-1]

  def shuffled(self, items: Sequence[T]) -> list[T]:
    out = list(items)
    for i in range(len(out) - 1, 0, -1):
      j = self.below(i + 1)
      out[i], out[j] = out[j], out[i]
    return out

  def sample(self, items: Sequence[T], k: int) -> list[T]:
    return self.shuffled(items)[:k]


class World:
  """People, places and objects; each action is one sentence of `story`.

  What the story establishes, with the index of the sentences that establish it:
    where[p], last_move[p]        the place person p went to last and the sentence saying so;
    holder[o], got[o]             who holds object o and the sentence where they got it;
    dropped[o]                    (place, supporting) for an object lying where it was dropped;
    trail[o]                      the distinct places o was carried through, each as (place, supporting, got index);
    acquired[p, o], released[p, o]  p's latest acquisition of o and the release that followed it, if any;
    gives                         every giving, as (index, giver, object, receiver).
  A person must have gone somewhere before handling objects, so every object that was ever held has a known place.
  """

  def __init__(self, rng: Rng, people: Sequence[str], places: Sequence[str], objects: Sequence[str] = ()):
    self.rng = rng
    self.people, self.places, self.objects = tuple(people), tuple(places), tuple(objects)
    self.story: list[str] = []
    self.where: dict[str, str] = {}
    self.last_move: dict[str, int] = {}
    self.holder: dict[str, str] = {}
    self.got: dict[str, int] = {}
    self.dropped: dict[str, tuple[str, list[int]]] = {}
    self.trail: dict[str, list[tuple[str, list[int], int]]] = {o: [] for o in self.objects}
    self.acquired: dict[tuple[str, str], int] = {}
    self.released: dict[tuple[str, str], int] = {}
    self.gives: list[tuple[int, str, str, str]] = []  # (index, giver, object, receiver)

  # -- the actions, each told by one sentence --------------------------------------------------------------------

  def _say(self, sentence: str) -> int:
    self.story.append(sentence)
    return len(self.story) - 1

  def move(self, person: str, place: str) -> int:
    i = self._say(f"{person} {self.rng.choice(MOVE_VERBS)} the {place}.")
    self.where[person], self.last_move[person] = place, i
    for obj, who in self.holder.items():
      if who == person:
        self.trail[obj].append((place, sorted({self.got[obj], i}), self.got[obj]))
    return i

  def get(self, person: str, obj: str) -> int:
    there = " there" if self.rng.chance(0.3) else ""
    i = self._say(f"{person} {self.rng.choice(GET_VERBS)} the {obj}{there}.")
    self._acquire(person, obj, i)
    place = self.where[person]
    entry = (place, sorted({self.last_move[person], i}), i)
    trail = self.trail[obj]
    if trail and trail[-1][0] == place:
      trail[-1] = entry  # same place, newer evidence: this holder's move and pick-up
    else:
      trail.append(entry)
    return i

  def drop(self, person: str, obj: str) -> int:
    i = self._say(f"{person} {self.rng.choice(DROP_VERBS)} the {obj}.")
    del self.holder[obj]
    self.released[person, obj] = i
    self.dropped[obj] = (self.where[person], sorted({self.last_move[person], i}))
    return i

  def give(self, person: str, obj: str, receiver: str) -> int:
    i = self._say(f"{person} {self.rng.choice(GIVE_VERBS)} the {obj} to {receiver}.")
    self.released[person, obj] = i
    self._acquire(receiver, obj, i)
    self.gives.append((i, person, obj, receiver))
    return i

  def _acquire(self, person: str, obj: str, i: int) -> None:
    self.holder[obj], self.got[obj] = person, i
    self.dropped.pop(obj, None)
    self.acquired[person, obj] = i
    self.released.pop((person, obj), None)

  # -- the actions possible now ----------------------------------------------------------------------------------

  def possible(self, kind: str) -> list[tuple]:
    """The argument tuples of every `kind` action ("move", "meet", "get", "drop", "give") possible now."""
    where = self.where
    if kind == "move":
      return [(p, l) for p in self.people for l in self.places if l != where.get(p)]
    if kind == "meet":  # a move to where someone else is, so that giving becomes possible
      return sorted({(p, where[q]) for p in self.people for q in where if q != p and where[q] != where.get(p)})
    if kind == "get":
      return [(p, o) for p in self.people if p in where for o in self.objects
              if o not in self.holder and self.dropped.get(o, (where[p],))[0] == where[p]]
    if kind == "drop":
      return [(p, o) for o, p in sorted(self.holder.items())]
    if kind == "give":
      return [(p, o, q) for o, p in sorted(self.holder.items()) for q in self.people
              if q != p and where.get(q) == where[p]]
    raise ValueError(f"World.possible(kind={kind!r}): kind must be one of move, meet, get, drop, give")

  def step(self, **weights: float) -> int:
    """One random action, its kind drawn by `weights` among the kinds possible now; returns its sentence index."""
    kinds = [k for k in weights if weights[k] > 0 and self.possible(k)]
    kind = self.rng.weighted(kinds, [weights[k] for k in kinds])
    args = self.rng.choice(self.possible(kind))
    return getattr(self, "move" if kind == "meet" else kind)(*args)

  def carrying(self, person: str) -> list[str]:
    """The objects `person` holds, in the order they got them."""
    held = [o for o, p in self.holder.items() if p == person]
    return sorted(held, key=lambda o: self.acquired[person, o])
