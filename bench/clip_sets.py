#!/usr/bin/env python3
"""Write the two text sets the CLIP estimate is tuned and judged on, as files in bench/.

    python3 bench/clip_sets.py        # writes bench/clip_tuning.jsonl and bench/clip_heldout.jsonl

clip_tuning.jsonl: the 720 seeded captions of clip_tokens.py (its train and test halves) and
non-English texts made from the TUNING_* lists below. estimate_clip_tokens() was tuned on it.

clip_heldout.jsonl: texts made from the HELDOUT_* lists, written afresh for this check and never
looked at while tuning: English captions, tag lists and prompts on new words, accented Latin,
Greek, Hebrew, Cyrillic, Arabic, CJK and emoji. Each line is {"kind": ..., "text": ...}; the files
are committed, so the figures in CLIP.md do not depend on this script staying the same.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clip_tokens import build_sample  # noqa: E402


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split("|") if w.strip()]


# -- tuning: non-English words the estimate's new rules were fitted on --------------------------

TUNING_ACCENTED = _words("""
crème brûlée|café au lait|déjà vu|façade|naïve|résumé|piñata|señorita|jalapeño|mañana|Müller|
Straße|Grüße|schön|Mädchen|Kraków|Łódź|źdźbło|Gdańsk|Wrocław|Zürich|Genève|Besançon|fiancée|
éclair|crêpe|château|forêt|élégance|Málaga|Córdoba|niño|corazón|añejo|Äpfel|Öl|Übermensch|
""")
TUNING_GREEK = _words("Αθήνα|Θεσσαλονίκη|φιλοσοφία|θάλασσα|ήλιος|καλημέρα|Ακρόπολη|μύθος|Ελλάδα|αγάπη")
TUNING_HEBREW = _words("שלום|ירושלים|תל אביב|אהבה|ספר|משפחה|בית|שמש|ים|חיים")
TUNING_CYRILLIC = _words("Москва|привет|спасибо|девушка|зима|Санкт-Петербург|кошка|город|небо|лес")
TUNING_ARABIC = _words("مرحبا|القاهرة|سلام|كتاب|شمس|بحر")
TUNING_CJK = _words("""
東京|桜|猫|女の子|着物|富士山|ありがとう|こんにちは|北京|上海|你好|中国|龙|山水画|서울|한국|안녕하세요|
사랑|김치|初音ミク|魔法少女|制服|
""")
TUNING_EMOJI = _words("❤️|😀|🔥|✨|🌸|😂|👍|🎉|🐱|🌙|⭐|💀|🙏|😭|🥺|🌈|🍕|☕|🎨|👀")

# -- held out: written for the check, never used while tuning -----------------------------------

HELDOUT_ACCENTED = _words("""
São Paulo|coração|pão de queijo|saudade|açaí|Praha|Dvořák|Brno|čokoláda|Háček|Budapest Liszt Ferenc|
Győr|szép|köszönöm|İstanbul|Beşiktaş|güzel|çiçek|Reykjavík|Þórsmörk|fjörður|Hà Nội|phở|bánh mì|
Đà Nẵng|Ærø|smørrebrød|Tromsø|Åland|Cádiz|Jiménez|Ibáñez|Noël|Citroën|Loïc|Björk|Dürer|Jyväskylä|
""")
HELDOUT_GREEK = _words("Κρήτη|Σαντορίνη|Όλυμπος|ελιά|ουρανός|μουσική|Αφροδίτη|ποίηση|νησί|φως")
HELDOUT_HEBREW = _words("חיפה|ים המלח|שבת|תודה|ילדה|עיר|לילה|פרח|גן|אור")
HELDOUT_CYRILLIC = _words("Киев|Новосибирск|берёза|дорога|мальчик|солнце|река|звезда|София|Београд")
HELDOUT_ARABIC = _words("دمشق|قمر|وردة|صحراء|مدينة|نور")
HELDOUT_CJK = _words("""
京都|大阪|鳥居|侍|忍者|浴衣|お茶|ラーメン|アニメ|漢字|西安|长城|熊猫|茶馆|灯笼|부산|한복|바다|떡볶이|
미소|可愛い|夕焼け|星空|
""")
HELDOUT_EMOJI = _words("""
🥰|😎|🌊|🍜|🎸|🦊|🌻|💖|🤔|😴|🐉|🍓|🌟|💫|🎀|🦋|👑|🍂|❄️|☀️|🧡|💜|🙌|🤍|🫶|🏳️‍🌈|👩‍🎨|🇯🇵|✌️|♥️
""")

HELDOUT_TAGS = _words("""
solo_focus|aqua_eyes|orange_hair|grey_hair|streaked_hair|wavy_hair|messy_hair|drill_hair|hime_cut|
single_braid|low_twintails|hair_flower|hair_scrunchie|x_hair_ornament|star_hair_ornament|mole_under_eye|
freckles|dark_skin|pointy_ears|elf|demon_girl|oni_horns|kemonomimi_mode|rabbit_ears|wolf_tail|
feathered_wings|mechanical_arms|prosthesis|eyepatch|bandaid_on_face|nail_polish|lipstick|
hoop_earrings|cross_necklace|collar|sailor_collar|neckerchief|suspenders|plaid_skirt|
high-waist_skirt|denim_shorts|bike_shorts|leggings|striped_thighhighs|mary_janes|high_heels|
sneakers|knee_boots|trench_coat|puffer_jacket|raglan_sleeves|puffy_sleeves|wide_sleeves|
china_dress|qipao|hanfu|nun|habit|race_queen|idol|chef_hat|hard_hat|baseball_cap|
holding_phone|holding_microphone|holding_fan|holding_bouquet|eating|drinking|sleeping|reading|
stretching|leaning_forward|on_side|on_stomach|seiza|crossed_legs|hand_in_own_hair|
w|salute|thumbs_up|pointing_at_viewer|reaching_towards_viewer|looking_back|looking_away|
profile|close-up|feet_out_of_frame|head_out_of_frame|pov|fisheye|vanishing_point|
aquarium|library|train_interior|rooftop|alley|greenhouse|snowing|thunderstorm|aurora|
fireworks|candle|chandelier|stained_glass|graffiti|neon_lights|power_lines|vending_machine|
""")
HELDOUT_META = _words("""
masterpiece|amazing_quality|very_awa|absurdres|incredibly_absurdres|year_2022|rating_general|
rating_explicit|score_5_up|score_4_up|source_furry|source_pony|traditional_media|sketch|
""")
HELDOUT_PEOPLE = _words("""
an old woman knitting|a boy with a kite|a firefighter|a surfer|a cellist|a glassblower|
a girl in a wheelchair|twin sisters|a monk|a falconer|a woman in a hijab|a street vendor|
a mechanic|a pilot|a ranger|a child in a raincoat|a weightlifter|a gardener|
""")
HELDOUT_PLACES = _words("""
a rain-streaked bus window|a rooftop pool|an empty stadium|a ferry deck|a moonlit vineyard|
a hospital corridor|a tulip field|a lantern festival|a flooded street|a ski lift|a night market|
a lighthouse gallery|a hay barn|a glacier lagoon|an arcade|a record shop|a bakery counter|
""")
HELDOUT_DETAILS = _words("""
sunlight through venetian blinds|steam rising from a bowl|a cracked phone screen|chalk drawings|
a tangle of fairy lights|puddles reflecting signs|a half-open umbrella|tyre tracks in the snow|
a window box of geraniums|a pile of folded laundry|a dog-eared map|a paper crane|a peeling poster|
rust on the railings|a rainbow over the hills|dust motes in the air|an unmade bed|a chessboard mid-game|
""")
HELDOUT_PROMPT_BITS = _words("""
award winning|extremely detailed|8k wallpaper|subsurface scattering|global illumination|
isometric|low poly|claymation|papercut|stained glass style|synthwave|vaporwave|cottagecore|
dark fantasy|solarpunk|biopunk|art deco poster|pop art|impasto|sumi-e|tilt shift|
by moebius|by james jean|by yoshitaka amano|by hiroshi yoshida|by kilian eng|by jean giraud|
""")


def mixed(rng: random.Random, words: list[str], kind: str) -> str:
    """A caption, tag list or prompt built around one or more foreign words."""
    picked = rng.sample(words, min(len(words), rng.randint(1, 3)))
    shape = rng.randrange(4)
    if shape == 0:
        return ", ".join(picked)
    if shape == 1:
        return f"a photo of {picked[0]}, " + ", ".join(picked[1:] + ["soft light", "detailed"])
    if shape == 2:
        return "1girl, solo, " + ", ".join(picked) + ", looking at viewer, masterpiece"
    return f"{picked[0]} " + " ".join(picked[1:]) + (" at night" if kind != "emoji" else "")


def foreign_texts(rng: random.Random, lists: dict[str, list[str]], count: int) -> list[tuple[str, str]]:
    """count texts per kind: the bare words, then captions around them."""
    texts = []
    for kind, words in lists.items():
        texts += [(kind, word) for word in words]
        texts += [(kind, mixed(rng, words, kind)) for _ in range(count)]
    return texts


def heldout_english(rng: random.Random) -> list[tuple[str, str]]:
    """Captions, tag lists and prompts on the held-out words."""
    texts = []
    for _ in range(60):  # tag lists
        tags = rng.sample(HELDOUT_TAGS, rng.randint(12, 40))
        if rng.random() < 0.5:
            tags = [tag.replace("_", " ") for tag in tags]
        tags = rng.sample(HELDOUT_META, rng.randint(0, 3)) + [rng.choice(["1girl", "1boy", "2girls"])] + tags
        texts.append(("tags", ", ".join(tags)))
    for _ in range(60):  # prose
        sentences = [f"{rng.choice(HELDOUT_PEOPLE).capitalize()} in {rng.choice(HELDOUT_PLACES)}."]
        while sum(len(s.split()) for s in sentences) < rng.randint(30, 130):
            sentences.append(rng.choice([
                f"Behind them there is {rng.choice(HELDOUT_DETAILS)}.",
                f"The frame also holds {rng.choice(HELDOUT_DETAILS)} and {rng.choice(HELDOUT_DETAILS)}.",
                f"It’s {rng.choice(['early morning', 'late afternoon', 'almost midnight', 'noon'])}; "
                f"the light is {rng.choice(['flat', 'warm', 'bluish', 'harsh', 'soft'])}.",
                f"Shot from {rng.choice(['a low angle', 'eye level', 'above', 'across the street'])} "
                f"with a {rng.choice(['28mm', '50mm', '135mm'])} lens at f/{rng.choice(['2', '4', '8'])}.",
            ]))
        texts.append(("prose", " ".join(sentences)))
    for _ in range(60):  # weighted prompts
        parts = [rng.choice(HELDOUT_PEOPLE)] + rng.sample(HELDOUT_PROMPT_BITS, rng.randint(4, 12))
        parts = [f"({part}:{rng.choice(['1.1', '1.3', '0.7'])})" if rng.random() < 0.3 else part for part in parts]
        if rng.random() < 0.4:
            parts.append(f"<lora:{rng.choice(['detail_tweaker', 'anime_lineart_v2', 'flat2'])}:0.{rng.randint(3, 9)}>")
        texts.append(("sdxl", ", ".join(parts)))
    for _ in range(60):  # near the budget
        tags = [tag.replace("_", " ") for tag in rng.sample(HELDOUT_TAGS, rng.randint(16, 30))]
        texts.append(("short", ", ".join(["1girl"] + tags)))
    return texts


LISTS = ("ACCENTED", "GREEK", "HEBREW", "CYRILLIC", "ARABIC", "CJK", "EMOJI")


def main() -> int:
    here = Path(__file__).resolve().parent
    sample = build_sample(7)
    tuning = [(kind, text) for kind, text in sample["train"] + sample["test"]]
    tuning += foreign_texts(random.Random("tuning"), {name.lower(): globals()[f"TUNING_{name}"]
                                                      for name in LISTS}, 8)
    rng = random.Random("heldout")
    heldout = heldout_english(rng)
    heldout += foreign_texts(rng, {name.lower(): globals()[f"HELDOUT_{name}"] for name in LISTS}, 8)
    for name, rows in (("clip_tuning.jsonl", tuning), ("clip_heldout.jsonl", heldout)):
        with open(here / name, "w", encoding="utf-8") as handle:
            for kind, text in rows:
                handle.write(json.dumps({"kind": kind, "text": text}, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} texts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
