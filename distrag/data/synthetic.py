"""A seeded fictional world: the embedded default task (no downloads, no knowledge leaks).

People, cities and companies get invented, pronounceable names built from syllables, so no
pretrained model can know the facts. Each entity has one short passage; questions are phrased
differently from the passages and have short answers (a name, a city, a year, an occupation):

* single-hop (PopQA-like, ids ``s-000000``): one fact of one entity; gold = that entity's passage.
* two-hop bridge (HotPotQA-like, ids ``b-000000``): e.g. "In which city is the company that Velan
  Morkesh works for headquartered?"; gold = the person's passage and the company's passage. As in
  HotPotQA, some bridge passages name the question's subject (a company lists its staff, a city the
  people born there), so a trained question encoder can learn to reach them; others never do (a
  founder's passage does not name the company), and only multi-step retrieval would find those.

Retrieval is made non-trivial on purpose: first names and surnames are shared by several people,
company names share stems ("Quillon Dynamics", "Quillon Foods"), city names share stems, and many
passages repeat the same occupations, cities and employers. The same seed gives the same world,
passages, questions and answers, byte for byte.
"""

from __future__ import annotations

import random
import re
import warnings
from dataclasses import dataclass

from distrag.config import SyntheticConfig
from distrag.data.records import Corpus, Passage, Question, RAGData

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t",
           "tr", "v", "z", "th", "sh", "c", "j", "qu", "sk", "vr"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei", "ou", "ia"]
_CODAS = ["", "", "", "n", "r", "s", "l", "m", "k", "th", "sh", "nd", "rk", "st", "x"]
_SURNAME_ENDINGS = ["esh", "ov", "ane", "ard", "ski", "ell", "ström", "ez", "in", "as"]
_CITY_ENDINGS = ["a", "en", "ia", "holm", "ford", "vik", "ora", "um", "burg", "is"]
_REGION_ENDINGS = ["ia", "and", "mark", "ora", "eth"]
_COMPANY_SECTORS = {
    "Dynamics": "robotics", "Systems": "software", "Labs": "biotechnology", "Foods": "food processing",
    "Logistics": "shipping", "Textiles": "textile", "Energy": "energy", "Pharma": "pharmaceutical",
    "Motors": "automotive", "Analytics": "data analytics", "Instruments": "measurement equipment",
    "Brewing": "brewing",
}
_OCCUPATIONS = ["engineer", "architect", "nurse", "chemist", "pilot", "teacher", "lawyer", "carpenter",
                "photographer", "economist", "surgeon", "journalist", "geologist", "violinist",
                "translator", "accountant"]
_KNOWN_FOR = ["glassworks", "salt mines", "clock tower", "wool market", "lighthouse", "stone bridge",
              "botanical garden", "paper mills", "harbour", "observatory"]
_TIES = ["is a cousin of {a} and a close friend of {b}", "shares a flat with {a} and plays cards with {b}",
         "trained under {a} and later mentored {b}", "grew up next door to {a} and {b}",
         "regularly travels with {a} and {b}"]
_EVENTS = ["chess tournament", "science fair", "trade exhibition", "music festival", "regatta",
           "poetry evening", "engineering congress", "charity gala"]
_HOBBIES = ["collects old maps", "restores sailing boats", "plays chess in the evenings", "keeps bees",
            "paints watercolours", "runs marathons", "grows rare orchids", "builds model railways"]


@dataclass
class _Person:
    pid: str
    name: str
    occupation: str
    birth_year: int
    birth_city: int  # index into cities
    employer: int  # index into companies
    hobby: str
    friends: list[int]  # other people named in this person's passage (distractor mentions)


@dataclass
class _City:
    pid: str
    name: str
    region: str
    river: str
    founded: int
    known_for: str
    residents: list[int]  # people named in this city's passage (not necessarily born there)


@dataclass
class _Company:
    pid: str
    name: str
    sector: str
    hq: int  # index into cities
    founded: int
    founder: int  # index into people


def _pronounceable(name: str) -> bool:
    """No doubled vowels and no run of three consonants (counting th/sh/qu/ck as one)."""
    low = re.sub(r"th|sh|qu|ck", "T", name.lower())
    return not re.search(r"([aeiou])\1|[^aeiouy ]{3}", low)


@dataclass
class _Event:
    """A distractor passage: an event naming a person, two relatives and someone else. No question
    is ever asked about it; it only competes with the people's own passages in retrieval."""

    pid: str
    kind: str
    year: int
    city: int
    people: list[int]


class _Names:
    """Unique pronounceable invented names (case-insensitive uniqueness across all pools)."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def syllable(self, coda: bool = True) -> str:
        r = self.rng
        return r.choice(_ONSETS) + r.choice(_VOWELS) + (r.choice(_CODAS) if coda else "")

    def ok(self, name: str, max_len: int = 10) -> bool:
        return 3 <= len(name) <= max_len and name.lower() not in self.used and _pronounceable(name)

    def new(self, make, max_len: int = 10) -> str:
        for _ in range(100_000):
            name = make()
            if self.ok(name, max_len):
                self.used.add(name.lower())
                return name
        raise RuntimeError("could not invent enough distinct names")  # unreachable at sane sizes

    def stem(self, n_syll: int = 2) -> str:
        return "".join(self.syllable(coda=i == n_syll - 1 or self.rng.random() < 0.2)
                       for i in range(n_syll)).capitalize()


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass
class World:
    people: list[_Person]
    cities: list[_City]
    companies: list[_Company]
    events: list[_Event]


def build_world(n_people: int, seed: int) -> World:
    """People, cities and companies with their facts. Sizes: cities = max(3, n/6), companies =
    max(3, n/5), regions = max(2, cities/4), rivers = max(2, cities/3)."""
    rng = random.Random(f"distrag-synthetic-{seed}")
    names = _Names(rng)
    n_cities, n_companies = max(3, n_people // 6), max(3, n_people // 5)
    width = max(4, len(str(max(n_people, n_cities, n_companies))))

    regions = [names.new(lambda: names.stem(2) + rng.choice(_REGION_ENDINGS), max_len=10)
               for _ in range(max(2, n_cities // 4))]
    rivers = [names.new(lambda: names.stem(1)) for _ in range(max(2, n_cities // 3))]
    # City names come in families sharing a stem (Tarsa, Tarsholm) to confuse lexical matching.
    city_names: list[str] = []
    while len(city_names) < n_cities:
        stem = names.new(lambda: names.stem(rng.choice([1, 2])), max_len=7)
        family = [stem + e for e in rng.sample(_CITY_ENDINGS, len(_CITY_ENDINGS))
                  if names.ok(stem + e, max_len=12)][:2]
        for name in family[: n_cities - len(city_names)]:
            names.used.add(name.lower())
            city_names.append(name)
    cities = [_City(f"city-{i + 1:0{width}d}", nm, rng.choice(regions), rng.choice(rivers),
                    rng.randint(1100, 1850), rng.choice(_KNOWN_FOR), rng.sample(range(n_people), 2))
              for i, nm in enumerate(city_names)]

    # People come in families: a surname stem with sibling endings (Morkesh, Morkov, Morkane) whose
    # members reuse a handful of first names, so most people have namesakes that differ in one part.
    firsts = [names.new(lambda: names.stem(2), max_len=8) for _ in range(max(5, n_people // 4))]
    n_fam = -(-n_people // 12)
    families: list[list[str]] = []
    for f in range(n_fam):
        size = n_people // n_fam + (f < n_people % n_fam)
        surnames: list[str] = []
        while len(surnames) < 3:
            stem = names.stem(rng.choice([1, 2]))
            surnames = [stem + e for e in rng.sample(_SURNAME_ENDINGS, len(_SURNAME_ENDINGS))
                        if names.ok(stem + e, max_len=11)][:3]
        names.used.update(s.lower() for s in surnames)
        combos = [f"{fn} {sn}" for fn in rng.sample(firsts, 5) for sn in surnames]
        families.append(rng.sample(combos, size))
    full_names = [name for fam in families for name in fam]
    rng.shuffle(full_names)
    family = {name: f for f, names_f in enumerate(families) for name in names_f}
    people = [_Person(f"person-{i + 1:0{width}d}", name, rng.choice(_OCCUPATIONS), rng.randint(1935, 1985),
                      rng.randrange(n_cities), -1, rng.choice(_HOBBIES), [])
              for i, name in enumerate(full_names)]
    # Each passage names two other people: a relative (same surname stem) and anyone else.
    for i, p in enumerate(people):
        kin = [j for j, q in enumerate(people) if j != i and family[q.name] == family[p.name]]
        first = rng.choice(kin) if kin else rng.choice([j for j in range(n_people) if j != i])
        p.friends = [first, rng.choice([j for j in range(n_people) if j not in (i, first)])]

    # Companies come in families sharing a stem (Quillon Dynamics, Quillon Foods).
    company_names: list[tuple[str, str]] = []
    while len(company_names) < n_companies:
        stem = names.new(lambda: names.stem(2))
        for suffix in rng.sample(sorted(_COMPANY_SECTORS), 2)[: n_companies - len(company_names)]:
            company_names.append((f"{stem} {suffix}", _COMPANY_SECTORS[suffix]))
    founders = rng.sample(range(n_people), n_companies) if n_companies <= n_people else \
        [rng.randrange(n_people) for _ in range(n_companies)]
    companies = [_Company(f"company-{i + 1:0{width}d}", nm, sector, rng.randrange(n_cities),
                          people[founders[i]].birth_year + rng.randint(24, 38), founders[i])
                 for i, (nm, sector) in enumerate(company_names)]
    for p in people:
        p.employer = rng.randrange(n_companies)
    events = []
    for i in range(n_people // 2):
        host = rng.randrange(n_people)
        kin = [j for j in range(n_people) if j != host and family[people[j].name] == family[people[host].name]]
        named = [host, *rng.sample(kin, min(2, len(kin)))]
        named.append(rng.choice([j for j in range(n_people) if j not in named]))
        events.append(_Event(f"event-{i + 1:0{width}d}", rng.choice(_EVENTS), rng.randint(1960, 2020),
                             rng.randrange(n_cities), named))
    return World(people, cities, companies, events)


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _passages(w: World, rng: random.Random) -> list[Passage]:
    out = []
    for p in w.people:
        city, comp = w.cities[p.birth_city].name, w.companies[p.employer].name
        occ = f"{_article(p.occupation)} {p.occupation}"
        body = rng.choice([
            f"{p.name} is {occ} born in {p.birth_year} in {city} who works for {comp}.",
            f"Born in {city} in {p.birth_year}, {p.name} became {occ} and is now on the staff of {comp}.",
            f"{p.name}, {occ} by training, was born in {city} in {p.birth_year} and now has a job at {comp}.",
        ])
        a, b = (w.people[j].name for j in p.friends)
        first = p.name.split()[0]
        body += f" {first} {rng.choice(_TIES).format(a=a, b=b)}, and in spare time {p.hobby}."
        out.append(Passage(p.pid, p.name, body))
    for c in w.cities:
        body = rng.choice([
            (f"{c.name} is a city in the {c.region} region, on the river {c.river}. {c.name} was founded "
             f"in {c.founded} and is known for its {c.known_for}."),
            (f"Founded in {c.founded}, {c.name} lies on the river {c.river} in the {c.region} region. "
             f"Visitors come to {c.name} for its {c.known_for}."),
        ])
        a, b = (w.people[j].name for j in c.residents)
        body += f" Well-known residents of {c.name} include {a} and {b}."
        natives = [q.name for q in w.people if w.cities[q.birth_city] is c]
        if natives:
            body += f" People born in {c.name} include {_join(natives)}."
        out.append(Passage(c.pid, c.name, body))
    for m in w.companies:
        hq, founder = w.cities[m.hq].name, w.people[m.founder].name
        body = rng.choice([
            (f"{m.name} is {_article(m.sector)} {m.sector} company headquartered in {hq}. {m.name} was "
             f"founded in {m.founded} by {founder}."),
            f"{founder} started {m.name} in {m.founded}. The {m.sector} firm has its head office in {hq}.",
        ])
        staff = [q.name for q in w.people if w.companies[q.employer] is m]
        if staff:
            body += f" People who work for {m.name} include {_join(staff)}."
        out.append(Passage(m.pid, m.name, body))
    for e in w.events:
        city = w.cities[e.city].name
        a, b, c, d = (w.people[j].name for j in e.people + e.people[:4 - len(e.people)])
        title = f"{e.year} {city} {e.kind}"
        body = rng.choice([
            f"The {title} was opened by {a}; {b} and {c} were honoured there, and {d} handed out the prizes.",
            f"At the {title}, {a} and {b} gave the opening speeches and {c} closed the evening with {d}.",
            f"The {title} was organised by {a}; {b}, {c} and {d} were among the guests.",
        ])
        out.append(Passage(e.pid, title, body))
    return out


# (relation, question templates, answer, gold ids) for each single-hop and two-hop fact.
_Cand = tuple[str, list[str], str, tuple[str, ...], dict]


def _single_hop(w: World) -> list[_Cand]:
    out: list[_Cand] = []
    for p in w.people:
        s, g = p.name, (p.pid,)
        out += [
            ("birth_city", [f"Where was {s} born?", f"What is the birthplace of {s}?",
                            f"In which city did {s} come into the world?"], w.cities[p.birth_city].name, g, {}),
            ("birth_year", [f"In what year was {s} born?", f"When was {s} born?",
                            f"What is the year of birth of {s}?"], str(p.birth_year), g, {}),
            ("employer", [f"Which company employs {s}?", f"Who is the employer of {s}?",
                          f"For which company does {s} work?"], w.companies[p.employer].name, g, {}),
            ("occupation", [f"What is {s}'s occupation?", f"What does {s} do for a living?",
                            f"What is the profession of {s}?"], p.occupation, g, {}),
        ]
    for m in w.companies:
        s, g = m.name, (m.pid,)
        out += [
            ("headquarters", [f"Where is {s} headquartered?", f"In which city is the head office of {s}?"],
             w.cities[m.hq].name, g, {}),
            ("founded", [f"In what year was {s} established?", f"When was {s} set up?"], str(m.founded), g, {}),
            ("founder", [f"Who founded {s}?", f"Who is the founder of {s}?"], w.people[m.founder].name, g, {}),
        ]
    for c in w.cities:
        s, g = c.name, (c.pid,)
        out += [
            ("region", [f"In which region is {s}?", f"Which region is {s} part of?"], c.region, g, {}),
            ("river", [f"Which river flows through {s}?", f"What river runs through {s}?"], c.river, g, {}),
            ("city_founded", [f"When was the city of {s} founded?", f"In what year was {s} founded?"],
             str(c.founded), g, {}),
        ]
    return out


def _two_hop(w: World) -> list[_Cand]:
    out: list[_Cand] = []
    for j, p in enumerate(w.people):
        s = p.name
        comp, city = w.companies[p.employer], w.cities[p.birth_city]
        gc, gb = (p.pid, comp.pid), (p.pid, city.pid)
        out += [
            ("employer_headquarters", [f"In which city is the company that {s} works for headquartered?",
                                       f"Where is the head office of {s}'s employer?"],
             w.cities[comp.hq].name, gc, {"bridge": comp.name}),
            ("employer_founded", [f"In what year was the company that employs {s} established?",
                                  f"When was {s}'s employer set up?"], str(comp.founded), gc, {"bridge": comp.name}),
            ("birthplace_region", [f"In which region is the city where {s} was born?",
                                   f"Which region is {s}'s birthplace part of?"], city.region, gb,
             {"bridge": city.name}),
            ("birthplace_river", [f"Which river flows through the city where {s} was born?",
                                  f"What river runs through {s}'s birthplace?"], city.river, gb,
             {"bridge": city.name}),
        ]
        if comp.founder != j:
            out.append(("employer_founder", [f"Who founded the company that {s} works for?",
                                             f"Who is the founder of {s}'s employer?"],
                        w.people[comp.founder].name, gc, {"bridge": comp.name}))
    for m in w.companies:
        f, hq = w.people[m.founder], w.cities[m.hq]
        gf, gh = (m.pid, f.pid), (m.pid, hq.pid)
        out += [
            ("founder_birth_city", [f"Where was the founder of {m.name} born?",
                                    f"In which city was the person who founded {m.name} born?"],
             w.cities[f.birth_city].name, gf, {"bridge": f.name}),
            ("founder_birth_year", [f"In what year was the founder of {m.name} born?",
                                    f"When was the person who started {m.name} born?"], str(f.birth_year), gf,
             {"bridge": f.name}),
            ("headquarters_region", [f"In which region is the city where {m.name} is headquartered?",
                                     f"Which region is home to the head office of {m.name}?"], hq.region, gh,
             {"bridge": hq.name}),
        ]
    return out


def _sample(cands: list[_Cand], k: int, kind: str, n_people: int, rng: random.Random) -> list[_Cand]:
    if k > len(cands):
        warnings.warn(f"synthetic: {k} {kind} questions requested but a world of {n_people} people allows "
                      f"only {len(cands)} distinct ones; generating {len(cands)} (raise n_entities for more)",
                      stacklevel=3)
        k = len(cands)
    return rng.sample(cands, k)


def make_synthetic(cfg: SyntheticConfig | None = None) -> RAGData:
    """Generate the synthetic task described by ``cfg`` (deterministic given ``cfg.seed``)."""
    cfg = cfg or SyntheticConfig()
    world = build_world(cfg.n_entities, cfg.seed)
    rng = random.Random(f"distrag-synthetic-text-{cfg.seed}")
    corpus = Corpus(_passages(world, rng), source=f"synthetic(seed={cfg.seed})")

    questions: list[Question] = []
    for prefix, hops, kind, cands, k in (("s", 1, "single-hop", _single_hop(world), cfg.n_single_hop),
                                         ("b", 2, "two-hop", _two_hop(world), cfg.n_two_hop)):
        for i, (relation, templates, answer, gold, extra) in enumerate(
                _sample(cands, k, kind, cfg.n_entities, rng)):
            meta = {"hops": hops, "relation": relation, **extra}
            questions.append(Question(f"{prefix}-{i:06d}", rng.choice(templates), (answer,), gold, meta=meta))
    # Interleave single- and two-hop questions so that max_questions keeps a mix of both.
    rng.shuffle(questions)
    return RAGData(name=f"synthetic:seed{cfg.seed}", corpus=corpus, questions=questions)
