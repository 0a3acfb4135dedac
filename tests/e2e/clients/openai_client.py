"""Talks to tandemd with the official `openai` package, as an application would.

Usage: openai_client.py BASE_URL API_KEY
Prints one JSON object: the non-streaming answer, the streamed answer, and the model list.
"""
import json
import sys

import openai


def main():
    base_url, api_key = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=60)
    models = [m.id for m in client.models.list().data]
    messages = [{"role": "user", "content": "Using the numbers 3, 7 and 25, make 46."}]

    raw = client.chat.completions.with_raw_response.create(
        model=models[0], messages=messages, max_tokens=16, temperature=0)
    completion = raw.parse()
    extra = completion.model_extra or {}

    chunks, streamed, final_tandem = 0, "", None
    stream = client.chat.completions.create(
        model=models[0], messages=messages, max_tokens=16, stream=True,
        stream_options={"include_usage": True})
    finish_reason, usage = None, None
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage.total_tokens
        for choice in chunk.choices:
            streamed += choice.delta.content or ""
            if choice.finish_reason:
                finish_reason = choice.finish_reason
        final_tandem = (chunk.model_extra or {}).get("tandem", final_tandem)

    try:
        client.chat.completions.create(model=models[0], messages=[], max_tokens=4)
        bad_request = None
    except openai.BadRequestError as e:
        bad_request = {"status": e.status_code, "message": str(e)}

    print(json.dumps({
        "models": models,
        "content": completion.choices[0].message.content,
        "finish_reason": completion.choices[0].finish_reason,
        "usage": completion.usage.total_tokens,
        "route_header": raw.headers.get("x-tandem-route"),
        "tandem": extra.get("tandem"),
        "stream_chunks": chunks,
        "stream_text": streamed,
        "stream_finish_reason": finish_reason,
        "stream_usage": usage,
        "stream_tandem": final_tandem,
        "bad_request": bad_request,
    }))


if __name__ == "__main__":
    main()
