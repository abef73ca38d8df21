#!/usr/bin/env python3
"""How close ollama_generate's CLIP counts come to the real CLIP tokenizer.

    python3 bench/clip_tokens.py [VOCAB] [--set heldout|tuning] [--exact] [--worst 10]

Reads bench/clip_heldout.jsonl (default; never tuned on) or bench/clip_tuning.jsonl (written by
bench/clip_sets.py) and compares estimate_clip_tokens() (or, with --exact, ClipTokenizer) with
OpenAI's CLIP tokenizer (without BOS/EOS): mean absolute and signed error, the share within +-5 %
and +-10 %, the 75-token budget calls it gets wrong, with a safety band, and the worst cases.

VOCAB is bpe_simple_vocab_16e6.txt.gz or a folder holding it (default: $CLIP_TOKENIZER_DIR, then
the one an installed open_clip ships). The reference is OpenAI's SimpleTokenizer written out here
with ftfy and regex, which the interpreter running this script needs (see bench/CLIP.md). Without
them it prints the estimates and says why it skipped the comparison. build_sample() makes the 720
seeded captions that bench/clip_sets.py puts in the tuning set.
"""

from __future__ import annotations

import argparse
import gzip
import html
import importlib.util
import json
import os
import random
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: ollama_generate.py

from ollama_generate import ClipTokenizer, estimate_clip_tokens

BUDGET = 75  # CLIP's 77 positions less BOS and EOS

# ---------------------------------------------------------------------------------------------
# Vocabularies. Every list is split in two by a seeded shuffle: the training captions use one half,
# the test captions the other. The few glue words of the templates are shared.


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split("|") if w.strip()]


BOORU_GENERAL = _words("""
solo|long_hair|short_hair|medium_hair|very_long_hair|looking_at_viewer|blush|smile|open_mouth|
closed_mouth|blue_eyes|red_eyes|green_eyes|purple_eyes|yellow_eyes|heterochromia|brown_hair|
black_hair|blonde_hair|silver_hair|pink_hair|twintails|ponytail|side_ponytail|braid|hair_bun|
ahoge|bangs|blunt_bangs|hair_between_eyes|sidelocks|hair_ornament|hairclip|hair_ribbon|hairband|
animal_ears|cat_ears|fox_ears|tail|wings|horns|halo|thighhighs|pantyhose|skirt|pleated_skirt|
miniskirt|dress|sundress|shirt|white_shirt|collared_shirt|long_sleeves|short_sleeves|
detached_sleeves|sleeveless|jacket|open_jacket|hoodie|cardigan|sweater|turtleneck|serafuku|
school_uniform|necktie|bowtie|choker|jewelry|earrings|necklace|gloves|fingerless_gloves|boots|
thigh_boots|loafers|sandals|barefoot|hat|witch_hat|beret|headphones|glasses|holding|
holding_weapon|holding_sword|holding_umbrella|katana|staff|book|cup|sitting|standing|
lying|kneeling|squatting|walking|running|arms_up|hand_on_hip|hands_together|peace_sign|
outstretched_arm|from_side|from_above|from_below|from_behind|cowboy_shot|upper_body|full_body|
portrait|close-up|dutch_angle|depth_of_field|blurry_background|simple_background|
white_background|outdoors|indoors|sky|cloud|night|night_sky|starry_sky|sunset|moon|cherry_blossoms|
petals|falling_leaves|snow|rain|water|ocean|beach|forest|flower|rose|city|street|classroom|
bedroom|cafe|shrine|torii|lantern|chromatic_aberration|lens_flare|light_particles|sparkle|
wind|floating_hair|motion_blur|sweat|tears|fang|tongue_out|one_eye_closed|wink|pout|
expressionless|parted_lips|grin|smug|embarrassed|crossed_arms|head_tilt|v_arms|frilled_dress|
gothic_lolita|maid|maid_headdress|apron|kimono|yukata|hakama|obi|bodysuit|armor|gauntlets|cape|
cloak|scarf|belt|pouch|backpack|bag|zettai_ryouiki|absolute_territory|thigh_strap|garter_straps|
ribbon|bow|frills|lace|see-through|off_shoulder|bare_shoulders|collarbone|midriff|navel|
""")

BOORU_CHARACTERS = _words("""
hatsune_miku|kagamine_rin|megurine_luka|hakurei_reimu|kirisame_marisa|remilia_scarlet|
flandre_scarlet|izayoi_sakuya|konpaku_youmu|saigyouji_yuyuko|fujiwara_no_mokou|
ganyu_(genshin_impact)|hu_tao_(genshin_impact)|raiden_shogun|kamisato_ayaka|nahida_(genshin_impact)|
zhongli_(genshin_impact)|artoria_pendragon_(fate)|tohsaka_rin|matou_sakura|jeanne_d'arc_(fate)|
rem_(re:zero)|emilia_(re:zero)|megumin|aqua_(konosuba)|asuna_(sao)|saber_(fate)|
makise_kurisu|shiina_mayuri|frieren|fern_(sousou_no_frieren)|yor_briar|anya_(spy_x_family)|
power_(chainsaw_man)|makima_(chainsaw_man)|gawr_gura|houshou_marine|usada_pekora|
kafka_(honkai:_star_rail)|firefly_(honkai:_star_rail)|amiya_(arknights)|texas_(arknights)|
""")

BOORU_SERIES = _words("""
touhou|vocaloid|genshin_impact|fate/grand_order|fate_(series)|re:zero_kara_hajimeru_isekai_seikatsu|
kono_subarashii_sekai_ni_shukufuku_wo!|sword_art_online|steins;gate|sousou_no_frieren|
spy_x_family|chainsaw_man|hololive|honkai:_star_rail|arknights|blue_archive|azur_lane|
kantai_collection|pokemon|idolmaster|love_live!|bocchi_the_rock!|jujutsu_kaisen|
""")

BOORU_ARTISTS = _words("""
wlop|ask_(askzy)|mika_pikazo|rella|ciloranko|as109|hiten_(hitenkei)|nardack|torino_aqua|
kantoku|tiv|void_0|ningen_mame|fuzichoco|sho_(sho_lwlw)|mignon|huke|redjuice|kyuri|lack|
""")

BOORU_META = _words("""
masterpiece|best_quality|high_quality|absurdres|highres|very_aesthetic|newest|official_art|
commentary_request|translated|lowres|sensitive|general|safe|rating_safe|rating_questionable|
score_9|score_8_up|score_7_up|score_6_up|source_anime|source_cartoon|year_2023|year_2024|
""")

KAOMOJI = _words("""
:d|:3|:o|;d|^_^|>_<|o_o|=_=|+_+|0_0|xd|:p|;)|:<|^^^|@_@|(_)|:q|>:)|</3|;o|
♥|♪|☆|★|(´・ω・`)|(≧▽≦)|¯\\_(ツ)_/¯|(╯°□°)╯|ヽ(・∀・)ﾉ|(｡•̀ᴗ-)✧|
""")

COUNTS = _words("1girl|2girls|3girls|1boy|2boys|multiple_girls|no_humans|6+girls|1other")

PROSE_SUBJECTS = _words("""
a young woman|an elderly man|a teenage girl|a middle-aged woman|a bearded man|a small boy|
a ginger cat|a black labrador|a red fox|a barn owl|a knight in plate armour|a street musician|
a ballet dancer|a fisherman|a beekeeper|a blacksmith|an astronaut|a samurai|a violinist|
a woman with freckles|a man with a shaved head|two children|a group of hikers|a chef|
a lighthouse keeper|a marathon runner|a cyclist|a tattooed bartender|a nun|a shepherd|
an android|a cyborg mercenary|a witch|a sorceress|an archaeologist|a sailor|a tailor|a potter|
""")

PROSE_ADJECTIVES = _words("""
weathered|elegant|tousled|freckled|ornate|rustic|minimalist|vibrant|muted|glossy|matte|faded|
intricate|delicate|rugged|serene|melancholic|whimsical|dramatic|luminous|hazy|misty|dusty|gilded|
tattered|embroidered|crumpled|polished|translucent|iridescent|bioluminescent|opalescent|
weatherbeaten|sun-bleached|moss-covered|rain-soaked|snow-dusted|art-nouveau|baroque|brutalist|
sumptuous|threadbare|verdigris|burnished|lacquered|filigreed|chiaroscuro|crepuscular|
""")

PROSE_CLOTHING = _words("""
a navy wool coat|a yellow raincoat|a leather jacket|a linen shirt|a silk kimono|a denim jacket|
a knitted cardigan|a tweed waistcoat|a sequined gown|a hooded cloak|a tank top|a turtleneck sweater|
a floral sundress|cargo trousers|a pleated skirt|a bomber jacket|a velvet blazer|overalls|
a trench coat|a hanbok|a dirndl|a sari|a poncho|a kilt|a chainmail hauberk|a flight suit|
a fedora|a beanie|aviator sunglasses|round spectacles|pearl earrings|a signet ring|
""")

PROSE_SETTINGS = _words("""
a crowded market|a foggy pier|a sunlit kitchen|an abandoned factory|a rooftop garden|
a bamboo forest|a snowy mountain pass|a neon-lit alley|a quiet library|a train platform|
a desert canyon|a coral reef|a cathedral nave|a greenhouse|a vineyard at dusk|a lavender field|
a subway car|a laundromat|a boxing gym|a jazz club|an observatory|a fjord|a salt flat|a mangrove swamp|
the streets of Ljubljana|a cafe in Montmartre|a souk in Marrakech|a temple in Kyoto|
a harbour in Reykjavík|a tram stop in Zürich|a rooftop in São Paulo|a square in Kraków|
a piazza in Siena|a tea house in Chengdu|a bazaar in Isfahan|
the outskirts of Tbilisi|a village near Oaxaca|a pier in Valparaiso|a canal in Giethoorn|
""")

PROSE_LIGHTING = _words("""
soft golden-hour light|harsh midday sun|diffused overcast light|dramatic rim lighting|
warm tungsten light|cold fluorescent light|candlelight|moonlight|volumetric god rays|
dappled sunlight|neon reflections|a single softbox|backlighting|blue-hour twilight|
low-key lighting|high-key lighting|firelight|bounce light from a white wall|
""")

PROSE_CAMERA = _words("""
shot on a 35mm lens|an 85mm portrait lens at f/1.8|a wide-angle 24mm lens|a telephoto lens|
shallow depth of field|a low angle|a high angle|an over-the-shoulder view|a dutch angle|
a Hasselblad medium format camera|Kodak Portra 400 film|Fujifilm Velvia|a Leica M6|
a tilt-shift effect|long exposure|motion blur|bokeh|a macro lens|an aerial drone view|
""")

PROSE_STYLES = _words("""
a candid documentary photograph|a cinematic still|an oil painting|a watercolour illustration|
a charcoal sketch|a linocut print|a gouache painting|a digital painting|a 3D render|
an ukiyo-e woodblock print|a risograph print|a pastel drawing|a vintage polaroid|
a daguerreotype|a fashion editorial|a concept art piece|a children's book illustration|
""")

PROSE_ARTISTS = _words("""
Hieronymus Bosch|Caravaggio|Johannes Vermeer|Alphonse Mucha|Gustav Klimt|Egon Schiele|
Hokusai|Utagawa Hiroshige|Ilya Repin|Ivan Aivazovsky|Zdzisław Beksiński|Joaquín Sorolla|Albrecht Dürer|
Moebius|Hayao Miyazaki|
Annie Leibovitz|Henri Cartier-Bresson|Sebastião Salgado|Édouard Manet|Vivian Maier|Wes Anderson|
Andrei Tarkovsky|Roger Deakins|Greg Rutkowski|Artgerm|Yoshitaka Amano|Kinuko Craft|
""")

PROSE_ACTIONS = _words("""
leaning against a railing|reading a tattered paperback|pouring tea|tuning a violin|
laughing at something off-camera|staring into the distance|holding a lantern|
adjusting her scarf|sketching in a notebook|feeding pigeons|repairing a bicycle|
kneading dough|walking a dog|carrying a wicker basket|climbing a rusty ladder|
sharpening a knife|playing an accordion|arranging peonies in a vase|
""")

PROSE_DETAILS = _words("""
a chipped enamel mug|a stack of vinyl records|a brass telescope|an overgrown trellis|
a rusted bicycle|paper lanterns|a flock of starlings|a half-eaten croissant|
scattered autumn leaves|peeling wallpaper|a wrought-iron balcony|a cracked mirror|
a hand-painted sign reading OPEN 24 HOURS|a vintage 1960s Vespa|a row of 12 bottles|
a clock showing 3:45|a street number 221B|a poster from 1987|
""")

SDXL_QUALITY = _words("""
masterpiece|best quality|ultra-detailed|highly detailed|8k|uhd|photorealistic|hyperrealistic|
sharp focus|intricate details|award-winning photograph|professional photography|
cinematic lighting|studio lighting|volumetric lighting|ray tracing|octane render|unreal engine 5|
""")

SDXL_SUBJECT = _words("""
1girl|1boy|solo|portrait of a cyberpunk samurai|elven princess|steampunk airship|
gothic cathedral interior|post-apocalyptic city|ancient dragon|cozy cabin in the woods|
astronaut floating in space|mermaid|sorceress casting a spell|mecha|battle-worn knight|
red dress|silver armor|flowing hair|glowing eyes|detailed face|beautiful detailed eyes|
long eyelashes|freckles|tattoos|scars|pointy ears|bioluminescent mushrooms|cherry blossoms|
neon signs|rain-slicked streets|foggy forest|crystal cave|floating islands|waterfall|
""")

SDXL_ARTISTS = _words("""
greg rutkowski|alphonse mucha|artgerm|wlop|ruan jia|krenz cushart|makoto shinkai|
james gurney|craig mullins|loish|ross tran|ilya kuvshinov|simon stalenhag|john singer sargent|
""")

SDXL_LORAS = _words("""
add_detail|more_details|epiNoiseoffset_v2|LowRA|xl_more_art-full|detailed_eye|
ghibli_style_offset|film_grain_v3|pixelart_xl|aesthetic_anime_v1|
""")

SDXL_TAGS = _words("""
trending on artstation|featured on pixiv|concept art|digital art|illustration|anime style|
film grain|bokeh|depth of field|wide shot|close-up|dynamic pose|looking at viewer|
from above|rim light|god rays|dramatic shadows|soft focus|color grading|vivid colors|
pastel colors|monochrome|high contrast|HDR|RAW photo|DSLR|Fujifilm XT3|35mm|f/1.4|ISO 200|
""")

VOCABULARIES = {name: value for name, value in globals().items()
                if name.isupper() and isinstance(value, list) and name != "VOCABULARIES"}


def split_vocabularies(seed: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Split every vocabulary into two disjoint halves: (training words, test words)."""
    train: dict[str, list[str]] = {}
    test: dict[str, list[str]] = {}
    for name, words in sorted(VOCABULARIES.items()):
        shuffled = sorted(words)
        random.Random(f"{seed}:{name}").shuffle(shuffled)
        half = (len(shuffled) + 1) // 2
        train[name], test[name] = shuffled[:half], shuffled[half:]
    return train, test


# ---------------------------------------------------------------------------------------------
# Caption makers: each takes a random generator and one half of the vocabularies.


def booru_tags(rng: random.Random, v: dict[str, list[str]]) -> str:
    """A booru tag caption of 20-50 tags, with underscores kept or turned into spaces."""
    count = rng.randint(20, 50)
    tags = [rng.choice(v["COUNTS"])]
    if rng.random() < 0.5:
        tags.append(rng.choice(v["BOORU_CHARACTERS"]))
    if rng.random() < 0.5:
        tags.append(rng.choice(v["BOORU_SERIES"]))
    if rng.random() < 0.3:
        tags.insert(0, "ohwx")
    general = rng.sample(v["BOORU_GENERAL"], min(count, len(v["BOORU_GENERAL"])))
    tags += general[: count - len(tags) - 3]
    tags += rng.sample(v["KAOMOJI"], rng.randint(0, 2))
    if rng.random() < 0.5:
        tags.append(rng.choice(v["BOORU_ARTISTS"]))
    if rng.random() < 0.6:
        meta = rng.sample(v["BOORU_META"], rng.randint(1, 4))
        tags = meta + tags if rng.random() < 0.5 else tags + meta
    if rng.random() < 0.5:  # the spaced style, as many trainers and UIs want it
        tags = [t.replace("_", " ") if t not in v["KAOMOJI"] else t for t in tags]
    return ", ".join(tags)


def flux_prose(rng: random.Random, v: dict[str, list[str]]) -> str:
    """A Flux-style natural-language caption of about 50-150 words."""
    target = rng.randint(50, 150)
    colours = ["ochre", "teal", "crimson", "sage green", "indigo", "burnt sienna", "cobalt blue",
               "mustard yellow"]
    subject = rng.choice(v["PROSE_SUBJECTS"])

    def adj() -> str:
        return rng.choice(v["PROSE_ADJECTIVES"])

    opener = rng.choice(v["PROSE_STYLES"])
    sentences = [(f"{opener[0].upper()}{opener[1:]} of {subject} {rng.choice(v['PROSE_ACTIONS'])} "
                  f"in {rng.choice(v['PROSE_SETTINGS'])}.")]
    makers: list[Callable[[], str]] = [
        lambda: f"The subject is wearing {rng.choice(v['PROSE_CLOTHING'])} and "
                f"{rng.choice(v['PROSE_CLOTHING'])}, both {adj()} and slightly {adj()}.",
        lambda: f"Behind them, {rng.choice(v['PROSE_DETAILS'])} and {rng.choice(v['PROSE_DETAILS'])} "
                f"sit against a {adj()} backdrop.",
        lambda: f"The scene is lit by {rng.choice(v['PROSE_LIGHTING'])}, which casts {adj()} shadows "
                f"across the {adj()} surfaces.",
        lambda: f"It was taken with {rng.choice(v['PROSE_CAMERA'])}, giving {rng.choice(v['PROSE_CAMERA'])}.",
        lambda: f"The mood is {adj()} and {adj()}, reminiscent of the work of "
                f"{rng.choice(v['PROSE_ARTISTS'])}.",
        lambda: f"In the foreground there is {rng.choice(v['PROSE_DETAILS'])}, slightly out of focus.",
        lambda: f"The atmosphere feels {adj()} \u2014 almost {adj()} \u2014 and the subject\u2019s gaze is "
                f"{rng.choice(['direct', 'distant', 'wary', 'amused', 'tired', 'curious'])}.",
        lambda: f"The colour palette is {adj()}, dominated by {rng.choice(colours)} "
                f"and {rng.choice(['cream', 'charcoal', 'rose', 'olive', 'slate grey', 'amber'])} tones.",
        lambda: f"Another figure, {rng.choice(v['PROSE_SUBJECTS'])}, is {rng.choice(v['PROSE_ACTIONS'])} "
                f"nearby, partly hidden by {rng.choice(v['PROSE_DETAILS'])}.",
        lambda: f"Her expression is {adj()}; his posture is {adj()}, and the whole image feels "
                f"{adj()} rather than {adj()}.",
    ]
    while sum(len(s.split()) for s in sentences) < target:
        sentences.append(rng.choice(makers)())
    text = " ".join(sentences)
    if rng.random() < 0.3:
        word = rng.choice(["ohwx", "sks", "TOK", "zwx"])
        trigger = f"{word} {rng.choice(['woman', 'man', 'person', 'style'])}"
        text = f"{trigger}, {text}"
    return text


def sdxl_prompt(rng: random.Random, v: dict[str, list[str]]) -> str:
    """An A1111/ComfyUI-style SDXL prompt with weights, emphasis, LoRA tags and BREAK."""
    parts: list[str] = []

    def weighted(text: str) -> str:
        r = rng.random()
        if r < 0.25:
            return f"({text}:{rng.choice(['1.1', '1.2', '1.3', '1.4', '0.8', '0.9', '1.15', '1.25'])})"
        if r < 0.35:
            return f"(({text}))"
        if r < 0.40:
            return f"[{text}]"
        return text

    parts += [weighted(q) for q in rng.sample(v["SDXL_QUALITY"], rng.randint(2, 5))]
    if rng.random() < 0.4:
        parts = ["score_9", "score_8_up", "score_7_up"][: rng.randint(1, 3)] + parts
    parts += [weighted(s) for s in rng.sample(v["SDXL_SUBJECT"], rng.randint(4, 10))]
    parts += [weighted(s) for s in rng.sample(v["SDXL_TAGS"], rng.randint(3, 8))]
    if rng.random() < 0.3:
        parts.append("BREAK")
        parts += [weighted(s) for s in rng.sample(v["SDXL_SUBJECT"], rng.randint(2, 5))]
    if rng.random() < 0.6:
        parts.append("by " + " and ".join(rng.sample(v["SDXL_ARTISTS"], rng.randint(1, 3))))
    for lora in rng.sample(v["SDXL_LORAS"], rng.randint(0, 2)):
        parts.append(f"<lora:{lora}:{rng.choice(['0.4', '0.6', '0.7', '0.8', '1'])}>")
    return ", ".join(parts)


def short_tags(rng: random.Random, v: dict[str, list[str]]) -> str:
    """A `prompt --encoder clip` style answer: 12-35 spaced tags, most near the 75-token budget."""
    tags = [rng.choice(v["COUNTS"]).replace("_", " ")]
    tags += [t.replace("_", " ") for t in rng.sample(v["BOORU_GENERAL"], rng.randint(10, 30))]
    tags += rng.sample(v["SDXL_SUBJECT"] + v["SDXL_TAGS"], rng.randint(1, 5))
    return ", ".join(tags)


MAKERS = {"tags": booru_tags, "prose": flux_prose, "sdxl": sdxl_prompt, "short": short_tags}


def build_sample(seed: int, train_size: int = 240,
                 test_size: int = 480) -> dict[str, list[tuple[str, str]]]:
    """Return {"train": [(kind, text), ...], "test": [...]}, the two halves on disjoint vocabularies."""
    halves = split_vocabularies(seed)
    sample: dict[str, list[tuple[str, str]]] = {}
    for split, words, size in (("train", halves[0], train_size), ("test", halves[1], test_size)):
        rng = random.Random(f"{seed}:{split}")
        kinds = list(MAKERS)
        sample[split] = [(kinds[i % len(kinds)], MAKERS[kinds[i % len(kinds)]](rng, words))
                         for i in range(size)]
    return sample


# ---------------------------------------------------------------------------------------------
# The reference: OpenAI's SimpleTokenizer (clip/simple_tokenizer.py), written out with ftfy and regex.


def find_vocab(given: str | None) -> Path | None:
    """bpe_simple_vocab_16e6.txt.gz: the file given, in the folder given, or in an installed open_clip."""
    candidates = [Path(given), Path(given) / "bpe_simple_vocab_16e6.txt.gz",
                  Path(given) / "clip" / "bpe_simple_vocab_16e6.txt.gz"] if given else []
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(Path(folder) / "bpe_simple_vocab_16e6.txt.gz")
    return next((path for path in candidates if path.is_file()), None)


def load_real_tokenizer(given: str | None) -> tuple[Callable[[str], int] | None, str]:
    """Return (count function, description) or (None, why it is unavailable)."""
    vocab = find_vocab(given)
    if vocab is None:
        return None, "no bpe_simple_vocab_16e6.txt.gz (argument, $CLIP_TOKENIZER_DIR or an installed open_clip)"
    try:
        import ftfy
        import regex
    except ImportError as error:
        return None, f"the reference needs {error.name!r} in this interpreter ({sys.executable})"
    merges = gzip.open(vocab).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    ranks = {tuple(merge.split()): rank for rank, merge in enumerate(merges)}
    table = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = table[:] + [256 + n for n in range(256 - len(table))]
    table += [byte for byte in range(256) if byte not in table]
    byte_chars = dict(zip(table, map(chr, codes)))
    pattern = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                            regex.IGNORECASE)
    cache: dict[str, int] = {"<|startoftext|>": 1, "<|endoftext|>": 1}

    def bpe(token: str) -> int:
        if token not in cache:
            word = tuple(byte_chars[b] for b in token.encode("utf-8"))
            word = word[:-1] + (word[-1] + "</w>",)
            while len(word) > 1:
                pairs = set(zip(word, word[1:]))
                bigram = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
                if bigram not in ranks:
                    break
                new, i = [], 0
                while i < len(word):
                    if i < len(word) - 1 and (word[i], word[i + 1]) == bigram:
                        new.append(word[i] + word[i + 1])
                        i += 2
                    else:
                        new.append(word[i])
                        i += 1
                word = tuple(new)
            cache[token] = len(word)
        return cache[token]

    def count(text: str) -> int:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = regex.sub(r"\s+", " ", text).strip().lower()
        return sum(bpe(token) for token in pattern.findall(text))

    return count, f"OpenAI's SimpleTokenizer (ftfy {ftfy.__version__}) with {vocab}"


# ---------------------------------------------------------------------------------------------
# Report.


def report(rows: list[tuple[str, str, int, int]], worst: int) -> None:
    """rows: (kind, text, estimate, real). Print the error figures and the budget calls."""
    def figures(subset: list[tuple[str, str, int, int]]) -> str:
        errors = [est - real for _, _, est, real in subset]
        rel = [abs(est - real) / real for _, _, est, real in subset]
        return (f"{len(subset):4d}  MAE {statistics.fmean(abs(e) for e in errors):5.2f}  "
                f"signed {statistics.fmean(errors):+5.2f}  "
                f"+-5% {100 * sum(r <= 0.05 for r in rel) / len(subset):5.1f}%  "
                f"+-10% {100 * sum(r <= 0.10 for r in rel) / len(subset):5.1f}%  "
                f"under {100 * sum(e < 0 for e in errors) / len(subset):5.1f}%  "
                f"real {min(r for *_, r in subset)}-{max(r for *_, r in subset)}")

    print("kind      n  error (estimate - real)")
    for kind in dict.fromkeys(row[0] for row in rows):
        subset = [row for row in rows if row[0] == kind]
        if subset:
            print(f"{kind:8s}{figures(subset)}")
    print(f"{'all':8s}{figures(rows)}")

    over = [(est > BUDGET, real > BUDGET) for _, _, est, real in rows]
    near = [row for row in rows if abs(row[3] - BUDGET) <= 10]
    print(f"\n{BUDGET}-token budget ({sum(r for _, r in over)} of {len(rows)} captions really over it, "
          f"{len(near)} within 10 tokens of it):")
    print(f"  right calls:   {sum(e == r for e, r in over)}")
    print(f"  false 'over':  {sum(e and not r for e, r in over)}  (estimate > {BUDGET}, real <= {BUDGET})")
    print(f"  false 'under': {sum(r and not e for e, r in over)}  (estimate <= {BUDGET}, real > {BUDGET}: "
          "a silent overflow)")
    for kind, text, est, real in rows:
        if (est > BUDGET) != (real > BUDGET):
            shown = text if len(text) <= 110 else text[:107] + "..."
            call = "over " if est > BUDGET else "under"
            print(f"    {call} {kind:5s} est {est:3d} real {real:3d}  {shown}")
    print("\nwith a safety band: call a caption over budget when the estimate exceeds T")
    for limit in (75, 74, 73, 72, 71, 70):
        calls = [(est > limit, real > BUDGET) for _, _, est, real in rows]
        print(f"  T={limit}: false 'over' {sum(e and not r for e, r in calls):3d}   "
              f"false 'under' {sum(r and not e for e, r in calls):3d}")

    if worst <= 0:
        return
    print(f"\nworst {worst} by absolute error:")
    for kind, text, est, real in sorted(rows, key=lambda row: -abs(row[2] - row[3]))[:worst]:
        shown = text if len(text) <= 150 else text[:147] + "..."
        print(f"  {kind:5s} est {est:3d} real {real:3d} ({est - real:+d})  {shown}")


def read_set(name: str) -> list[tuple[str, str]]:
    """bench/clip_NAME.jsonl as (kind, text) pairs."""
    with open(Path(__file__).resolve().parent / f"clip_{name}.jsonl", encoding="utf-8") as handle:
        return [(row["kind"], row["text"]) for row in map(json.loads, handle)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vocab", nargs="?", default=os.environ.get("CLIP_TOKENIZER_DIR"),
                        help="bpe_simple_vocab_16e6.txt.gz or a folder holding it (default: "
                             "$CLIP_TOKENIZER_DIR, then an installed open_clip)")
    parser.add_argument("--set", choices=("heldout", "tuning"), default="heldout",
                        help="bench/clip_heldout.jsonl (never tuned on) or bench/clip_tuning.jsonl")
    parser.add_argument("--exact", action="store_true",
                        help="measure ollama_generate's exact tokenizer (ClipTokenizer) instead of the estimate")
    parser.add_argument("--worst", type=int, default=10)
    args = parser.parse_args(argv)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    texts = read_set(args.set)
    print(f"set: bench/clip_{args.set}.jsonl, {len(texts)} texts")
    count, about = load_real_tokenizer(args.vocab)
    if args.exact:
        vocab = find_vocab(args.vocab)
        if vocab is None:
            print("no vocabulary for ClipTokenizer: give its path")
            return 2
        estimate = ClipTokenizer(str(vocab)).count
        print(f"measured: ollama_generate.ClipTokenizer({vocab})")
    else:
        estimate = estimate_clip_tokens
        print("measured: ollama_generate.estimate_clip_tokens")
    estimates = [estimate(text) for _, text in texts]
    if count is None:
        print(f"real tokenizer unavailable, comparison skipped: {about}")
        print("see bench/CLIP.md for how to get it. Estimates only:")
        for kind in dict.fromkeys(kind for kind, _ in texts):
            values = [est for (k, _), est in zip(texts, estimates, strict=True) if k == kind]
            print(f"  {kind:8s}{len(values):4d} texts, estimate {min(values)}-{max(values)}, "
                  f"mean {statistics.fmean(values):.1f}, over {BUDGET}: {sum(e > BUDGET for e in values)}")
        return 0
    print(f"real tokenizer: {about}\n")
    rows = [(kind, text, est, count(text)) for (kind, text), est in zip(texts, estimates, strict=True)]
    report(rows, args.worst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
