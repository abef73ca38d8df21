#!/usr/bin/env python3
"""The least a `prompt` call can cost in Python: bench/startup.py's baseline.

    python3 bench/baseline_prompt.py URL BODY_FILE

POSTs BODY_FILE (the JSON body ollama_generate.py sends, "stream": true) to URL/api/generate,
reads the NDJSON stream to the end and prints the text. Standard library only.
"""
import json
import sys
import urllib.request

url, body_file = sys.argv[1], sys.argv[2]
with open(body_file, "rb") as f:
    body = f.read()
request = urllib.request.Request(url + "/api/generate", data=body,
                                 headers={"Content-Type": "application/json"})
pieces = []
with urllib.request.urlopen(request, timeout=300) as response:
    for line in response:
        if line.strip():
            pieces.append(json.loads(line).get("response", ""))
print("".join(pieces).strip())
