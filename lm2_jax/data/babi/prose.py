"""Built-in, offline distractor text: seeded paragraphs of plain narrative English.

BABILong hides bAbI facts in book text (PG19). This module writes book-like prose without any download: each
paragraph keeps to one topic (weather, travel, cooking, history, the sea, farming, town life, letters, music),
and each sentence fills a template's slots from word lists, so a few hundred templates and lists give millions of
different sentences. None of it names the people, places or objects of the bAbI tasks, nor compass directions, so
it cannot change an answer.

  Prose().stream(rng)        an endless iterator of sentences (the distractor interface of `babilong`)
  generate_prose(seed, n)    about n words of paragraphs as one string
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from lm2_jax.data.babi.world import Rng

# Characters: (name, subject pronoun, possessive pronoun). No name here is used by a bAbI task.
CHARACTERS = (
    ("Eleanor", "she", "her"), ("Thomas", "he", "his"), ("Margaret", "she", "her"), ("Henry", "he", "his"),
    ("Agnes", "she", "her"), ("Walter", "he", "his"), ("Beatrice", "she", "her"), ("Edmund", "he", "his"),
    ("Clara", "she", "her"), ("Hugh", "he", "his"), ("Harriet", "she", "her"), ("Lionel", "he", "his"),
    ("Rosamund", "she", "her"), ("Percival", "he", "his"), ("Edith", "she", "her"), ("Ambrose", "he", "his"),
    ("the old captain", "he", "his"), ("the miller's widow", "she", "her"), ("the young clerk", "he", "his"),
    ("the innkeeper", "he", "his"), ("the doctor's sister", "she", "her"), ("the stranger", "he", "his"),
)

WORDS: dict[str, tuple[str, ...]] = {
    "time": ("in the early morning", "towards evening", "at first light", "late in the afternoon",
             "at midday", "long after midnight", "before the bells had rung", "as the season turned",
             "on the last day of the month", "in the grey hour before dawn", "during the long winter",
             "one still evening in autumn", "at the height of summer", "as the lamps were being lit"),
    "adv": ("slowly", "quietly", "at length", "without a word", "once more", "with some reluctance", "almost at once",
            "with great care", "in haste", "as if in a dream", "more than once", "with a sigh"),
    "feeling": ("a strange contentment", "an old unease", "a kind of weariness", "quiet pride", "faint regret",
                "sudden hope", "a restless longing", "deep gratitude", "a nameless dread", "simple happiness"),
    "sky": ("a low grey sky", "a heavy bank of cloud", "a sky the colour of slate", "a pale and cloudless sky",
            "a ragged veil of mist", "a sky full of racing cloud", "a thin copper haze"),
    "land": ("moors", "valley", "low hills", "river meadows", "marshes", "wide plain", "wooded slopes", "heath"),
    "wind": ("cold wind", "gusty breeze", "bitter gale", "warm breeze", "sharp wind", "damp wind"),
    "heights": ("hills", "high fells", "mountains", "ridge", "uplands", "downs"),
    "trees": ("elms", "poplars", "old oaks", "birches", "willows", "beeches", "hawthorns"),
    "weather_adj": ("wet", "dry", "bitter", "mild", "stormy", "strange", "long", "gentle", "cruel"),
    "season": ("winter", "spring", "summer", "autumn", "harvest", "thaw"),
    "smell": ("wet earth", "woodsmoke", "cut hay", "rain on stone", "the sea", "pine resin", "damp leaves"),
    "roofs": ("slate roofs", "thatched roofs", "chimney pots", "church tower", "empty lanes", "cobbled yard"),
    "water": ("streams", "ditches", "mill pond", "river", "brooks", "flooded fields"),
    "landscape": ("bare moorland", "dark pine woods", "rolling farmland", "salt marsh", "chalk hills",
                  "narrow wooded gorges", "open heath", "scattered hamlets"),
    "town": ("market town", "cathedral city", "fishing village", "old port", "county town", "mining village"),
    "river": ("river", "swollen stream", "ford", "estuary", "canal", "millrace"),
    "inn": ("the Bell", "the Golden Fleece", "the Crown and Anchor", "the Three Swans", "the Drover's Rest",
            "the White Hart"),
    "meal": ("a hurried supper", "bread and cheese", "a bowl of broth", "cold mutton", "a plate of oysters",
             "a late breakfast"),
    "hearth": ("stove", "open hearth", "iron range", "bread oven", "fire"),
    "scent": ("fresh bread", "roasting chestnuts", "onions and thyme", "baking pastry", "spiced wine",
              "burnt sugar", "simmering stock"),
    "dish": ("stew", "porridge", "soup", "sauce", "batter", "pudding", "broth", "jam"),
    "ingredient": ("salt", "butter", "honey", "flour", "wine", "vinegar", "cream", "barley"),
    "spice": ("pepper", "nutmeg", "cinnamon", "mace", "saffron", "cloves", "dried sage"),
    "side": ("boiled potatoes", "fresh peas", "brown bread", "roasted turnips", "a salad of cress",
             "pickled cabbage"),
    "drink": ("cider", "ale", "cold water", "strong tea", "elderflower wine", "coffee"),
    "ordinal": ("first", "second", "third", "fifth", "seventh", "ninth", "twelfth", "twentieth"),
    "reign": ("old king's reign", "new charter", "long regency", "great famine", "bishop's rule", "republic"),
    "institution": ("abbey", "guild of weavers", "grammar house", "town council", "hospital", "county court",
                    "great library"),
    "deed": ("founded", "dissolved", "rebuilt after the fire", "granted its charter", "moved across the river",
             "closed by order of the crown", "enlarged at great cost"),
    "fate": ("besieged", "burned", "spared", "sold", "abandoned", "fortified", "flooded"),
    "war": ("civil war", "long war with the French", "peasants' revolt", "border wars", "years of plague"),
    "treaty": ("treaty of the two rivers", "old alliance", "peace of the harbour towns", "charter of the free towns"),
    "ship": ("brig", "schooner", "old whaler", "merchantman", "fishing smack", "frigate", "packet boat"),
    "harbour": ("harbour", "roads", "bay", "sound", "estuary", "lee of the headland"),
    "num": ("two", "four", "five", "six", "seven", "nine", "eleven", "twelve", "twenty"),
    "crop": ("wheat", "barley", "oats", "rye", "hay", "beans"),
    "field": ("long field", "lower meadow", "valley fields", "strips by the church", "upper pasture"),
    "beast": ("cattle", "sheep", "geese", "horses", "pigs", "goats"),
    "street": ("high street", "market square", "narrow lane by the quay", "bridge", "square before the church"),
    "crowd": ("carts and barrows", "sailors on leave", "country people", "hawkers and beggars",
              "children and dogs", "soldiers"),
    "vendors": ("fishwives", "knife grinders", "flower sellers", "newsboys", "pie men", "ballad singers"),
    "relative": ("brother", "sister", "mother", "cousin", "aunt", "oldest friend", "godfather"),
    "adj": ("quiet", "hard", "strange", "long", "happy", "lonely", "busy", "uneventful", "troubled"),
    "missed": ("the sound of the sea", "the old house", "the long walks they had taken", "their evenings of cards",
               "the view from the hill", "the noise of the town"),
    "abstract": ("a single winter", "a kind word", "a long illness", "a sudden fortune", "an old debt",
                 "a letter never sent", "a chance meeting"),
    "instrument": ("violin", "organ", "flute", "harp", "cello", "old piano", "fiddle"),
    "tune": ("an old ballad", "a slow air", "a country dance", "a hymn", "a sea song", "a lullaby", "a march"),
    "place_inside": ("the parlour", "the library", "the drawing room", "the chapel", "the study", "the attic",
                     "the taproom", "the cellar"),
    "colour": ("grey", "green", "golden", "silver", "dark", "blue", "russet"),
    "ending": ("the candles burned down", "the fiddler fell asleep", "the moon was high", "the last cart went home",
               "the cider ran out", "the cocks began to crow"),
    "building": ("town hall", "church tower", "corn exchange", "old gatehouse", "market cross", "railway station"),
    "wrong": ("ten minutes slow", "stopped at a quarter past four", "a little fast", "striking the hours twice",
              "silent"),
    "changed": ("everything", "the whole house", "the mood of the town", "the colour of the water",
                "the sound of the wind", "the faces of the neighbours", "the shape of the hills"),
    "weekday": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday evening"),
    "better": ("better", "sweeter", "less ragged", "more certain", "more like music"),
    "listeners": ("everyone", "the servants", "even the dog", "the children", "the old man by the door",
                  "the guests", "the neighbours"),
    "outskirts": ("plots of cabbages and lines of washing", "brickfields and tanneries", "orchards and pigsties",
                  "rough pasture", "allotments and chicken runs", "a straggle of cottages"),
    "signers": ("men", "envoys", "old lords", "merchants", "bishops", "clerks"),
    "quay_work": ("mended their nets", "smoked their pipes", "tarred the hulls", "sorted the catch",
                  "coiled their ropes", "sharpened their knives"),
    "procession": ("procession", "funeral", "regiment", "bishop's carriage", "wedding party", "circus"),
    "survival": ("they survive to this day", "most were lost in the fire", "nobody has read them for a century",
                 "a scholar is still sorting them", "the key was never found"),
    "buildings": ("farmhouses", "a new bridge", "the mill", "the walls of the manor", "a row of cottages",
                  "the harbour wall"),
    "habit": ("walked down to the river", "wound the clocks", "fed the birds", "read aloud from an old book",
              "climbed the hill behind the house", "wrote in a small brown diary", "lit a candle in the window"),
    "span": ("the whole afternoon", "most of the winter", "three long evenings", "an hour or more", "the week"),
    "reading": ("sermons", "almanacs", "letters", "ledgers", "travel books", "newspapers", "poems"),
    "thing": ("lantern", "letter", "clock", "map", "portrait", "ledger", "key", "umbrella", "shawl"),
}

TOPICS: dict[str, tuple[str, ...]] = {
    "weather": (
        "{sky} hung over the {land} {time}, and the air smelled of {smell}.",
        "{Time} a {wind} came down from the {heights} and set the {trees} trembling.",
        "Rain fell {adv} upon the {roofs}, and the {water} rose before nightfall.",
        "Nobody could remember a {season} so {weather_adj}, though the old people spoke of one long ago.",
        "The clouds broke at last {time}, and a {colour} light spread across the {land}.",
        "By morning the frost had whitened the {roofs} and silenced the {water} beyond the {trees}.",
        "The {wind} blew for three days without pause, and then, {adv}, it died away.",
        "It was the kind of {season} weather that makes even the {trees} look tired.",
        "Thunder rolled somewhere beyond the {heights} {time}, but no rain came.",
        "The mist lay so thick over the {land} that the {trees} seemed to float in it.",
    ),
    "travel": (
        "The road wound through {landscape} for many miles before it came down to the {town}.",
        "{Name} had never seen such {landscape} before, and {he} stood a long while looking at it.",
        "The coach stopped at {inn}, where the horses were changed and the travellers took {meal}.",
        "They crossed the {river} by an old stone bridge {time}.",
        "{Name} crossed the {landscape} on foot, with nothing but a stick and a bundle over {his} shoulder.",
        "The {town} lay below them {time}, its smoke rising straight into the still air.",
        "At every turn of the road the {landscape} changed, and {name} grew more silent.",
        "The driver swore that the way through the {landscape} was shorter, but {listeners} did not believe him.",
        "They reached {inn} {time}, tired and soaked through.",
        "It was a journey of {num} days, and {name} remembered every one of them.",
    ),
    "cooking": (
        "The bread was set to rise beside the {hearth}, and the whole house smelled of {scent}.",
        "{Name} stirred the {dish} {adv}, adding a little {ingredient} and a pinch of {spice}.",
        "There was {dish} for supper, with {side} and a jug of {drink}.",
        "Nothing, {name} used to say, is ever improved by hurrying the {dish}.",
        "The {hearth} had to be fed every hour, or the {dish} would spoil.",
        "A good cook, {name} said, can tell by the smell alone when the {dish} wants more {ingredient}.",
        "On feast days the table held {side}, {meal} and more {drink} than anyone could finish.",
        "{Name} wrote down the recipe for the {dish}: {ingredient}, {spice} and a great deal of patience.",
        "The smell of {scent} drifted out into the lane {time} and brought {listeners} to the door.",
    ),
    "history": (
        "In the {ordinal} year of the {reign}, the {institution} was {deed}.",
        "The chroniclers record that the {town} was {fate} during the {war}.",
        "Few now remember the {treaty}, or the {signers} who signed it in the {ordinal} year of the {reign}.",
        "The {institution} kept its records in a chest with {num} locks, and {survival}.",
        "It was said that the {town} had been {fate} twice before anyone thought to build a wall.",
        "After the {war} the {institution} was {deed}, and the old families never forgave it.",
        "Historians still argue about what the {treaty} was meant to achieve, and why it failed {time}.",
        "The stones of the old {institution} were carried away to build {buildings}.",
        "In those days the {town} paid its taxes in {crop} and {beast}.",
    ),
    "sea": (
        "The {ship} rode at anchor in the {harbour}, her sails furled and her decks empty.",
        "For {num} days the wind held fair, and the crew of the {ship} spoke little.",
        "{Name} had sailed on the {ship} as a boy and never quite left the sea behind.",
        "The tide turned {time}, and the {ship} slipped out of the {harbour}.",
        "{Time} gulls wheeled over the {harbour}, crying as if something were lost.",
        "The sea was {colour} and calm {time}, but the old sailors did not trust it.",
        "A {wind} rose in the night, and by morning the {ship} was far from land.",
        "Along the quay the fishermen {quay_work} and talked of the {war}.",
    ),
    "farming": (
        "The {crop} stood ripe in the {field}, and the reapers were out before dawn.",
        "The {beast} were brought down from the {heights} {time}.",
        "{Name} walked the {field} every evening to see how the {crop} was doing.",
        "That year the {crop} failed, and the {beast} had to be sold at the fair.",
        "The harvest supper lasted until {ending}, and nobody minded the {weather_adj} weather.",
        "Hedges were laid and ditches cleared around the {field} in the dead months of the {season}.",
        "A good farmer, {name} used to say, watches the sky more than the market, even in {season}.",
        "The {beast} grazed on the {field} while the {crop} dried in stooks.",
    ),
    "town": (
        "The {street} was crowded with {crowd} and the cries of {vendors}.",
        "{Time} the {street} fell quiet, and only the watchman's lantern moved.",
        "{Name} lodged above a chandler's shop at the end of the {street}.",
        "On market days the {street} smelled of {smell} and fresh fish.",
        "The clock on the {building} had been {wrong} for as long as anyone could remember.",
        "Every shutter on the {street} was closed when the {procession} passed.",
        "{Name} bought a {thing} from a stall on the {street} and carried it home {adv}.",
        "Beyond the {street} the houses thinned out into {outskirts}.",
    ),
    "letters": (
        "{Name} wrote to {his} {relative} that the {season} had been {adj} and that {he} missed {missed}.",
        "It is a curious thing, {name} thought, how {abstract} can change a life.",
        "The letter from {name}'s {relative} lay unopened on the table for {num} days.",
        "{Name} read the letter twice, folded it {adv} and put it in a drawer.",
        "In {his} reply {name} said nothing about {abstract}, and that silence said a great deal.",
        "There was {feeling} in the way {name} spoke of those years.",
        "{Name} kept every letter {he} ever received, tied with ribbon in a box in {place_inside}.",
        "Looking back, {name} could not say when {feeling} had first taken hold of {his} heart.",
    ),
    "music": (
        "Someone in {place_inside} was playing {tune} on the {instrument}.",
        "{Name} had learned the {instrument} as a child and still played it {time}.",
        "The notes of {tune} drifted through {place_inside}, and {listeners} stopped to listen.",
        "The old {instrument} in {place_inside} was out of tune, but nobody had the heart to say so.",
        "When {name} played {tune}, {he} seemed to forget that anyone was listening.",
        "They sang {tune} together in {place_inside}, badly and with great pleasure.",
        "The choir practised {tune} every {weekday}, and every week it sounded a little {better}.",
    ),
}

# Sentences that fit any paragraph: they join the topic's own templates.
COMMON = (
    "{Name} said nothing for a while, and {listeners} waited {adv}.",
    "It was {feeling} that {name} would remember long afterwards.",
    "{Time} {changed} seemed to change.",
    "Nobody spoke of {abstract} again, though everyone thought of it {time}.",
    "{Name} found the {thing} in {place_inside} and wondered who had left it there.",
    "There was {feeling} in {place_inside} that nobody could explain.",
    "Years later, {name} would tell the story {adv}, and always a little differently.",
    "{Time} {name} {habit}, as {he} had done every {season} since childhood.",
    "Of all the {season}s {name} could remember, that one was the most {adj}.",
    "{Name} spent {span} in {place_inside}, reading old {reading} and saying little.",
    "The {thing} had belonged to {name}'s {relative}, and before that to someone else entirely.",
)

_SLOT = re.compile(r"\{(\w+)\}")


class Prose:
  """Endless seeded prose; a distractor source for `babilong.make_sample`."""

  def __init__(self, paragraph_sentences: tuple[int, int] = (4, 9)):
    lo, hi = paragraph_sentences
    if not 1 <= lo <= hi:
      raise ValueError(f"paragraph_sentences={paragraph_sentences!r}: needs 1 <= min <= max")
    self.paragraph_sentences = (lo, hi)

  def stream(self, rng: np.random.Generator | int) -> Iterator[str]:
    """Sentences, paragraph after paragraph, forever; the same for the same seed."""
    seed = rng if isinstance(rng, int) else int(rng.random() * 2**53)
    r = Rng(seed)
    topics = sorted(TOPICS)
    while True:
      yield from self.paragraph(r, r.choice(topics))

  def paragraph(self, r: Rng, topic: str) -> list[str]:
    """One paragraph on `topic`; each template is used at most once in it."""
    if topic not in TOPICS:
      raise ValueError(f"topic={topic!r}: use one of {', '.join(sorted(TOPICS))}")
    n = r.between(*self.paragraph_sentences)
    pool = r.shuffled(TOPICS[topic] + tuple(r.sample(COMMON, 2)))
    return [fill(template, r) for template in pool[:n]]


def fill(template: str, r: Rng) -> str:
  """The template with every slot filled; {Slot} gives a capitalised filling, {name}/{he}/{his} one character."""
  name, he, his = r.choice(CHARACTERS)
  own = {"name": name, "he": he, "his": his}

  def one(match: re.Match) -> str:
    slot = match.group(1)
    key = slot.lower()
    value = own[key] if key in own else r.choice(WORDS[key])
    return value[0].upper() + value[1:] if slot[0].isupper() else value

  text = _SLOT.sub(one, template)
  return text[0].upper() + text[1:]


def generate_prose(seed: int, num_words: int) -> str:
  """Paragraphs of prose, about `num_words` whitespace words in all (whole sentences), separated by blank lines."""
  if not isinstance(num_words, int) or num_words < 0:
    raise ValueError(f"num_words={num_words!r}: must be a non-negative integer")
  r, prose, paragraphs, words = Rng(seed), Prose(), [], 0
  topics = sorted(TOPICS)
  while words < num_words:
    sentences = prose.paragraph(r, r.choice(topics))
    paragraphs.append(" ".join(sentences))
    words += sum(len(s.split()) for s in sentences)
  return "\n\n".join(paragraphs)
