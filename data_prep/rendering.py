"""Chat rendering for training: `ChatRenderer` turns conversations into their chat template's text and the
character spans of each assistant answer with its end-of-turn token, many conversations per template call.
Which template is used is `templates.resolve_template`'s choice; tokens and label masks are the collator's."""

from __future__ import annotations

from typing import Any

from .records import DataError, quote, shorten
from .templates import ChatTemplate, render, to_messages

Spans = list[tuple[int, int]]


class ChatRenderer:
    """Renders LLaVA rows with `template` through `processor` (whose special tokens are the template's
    variables)."""

    def __init__(self, processor: Any, template: ChatTemplate):
        self.processor = processor
        self.template = template

    def messages(self, row: dict) -> list[dict]:
        """A row's turns as the template's messages (content blocks, or strings with the image text)."""
        return to_messages(row["conversations"], self.template)

    def render(self, sample_id: str, messages: list[dict]) -> tuple[str, Spans]:
        """The chat-template text and the character spans of each assistant turn (answer + end of turn).

        A span is what rendering the conversation through that answer adds to rendering it up to the
        generation prompt, cut after the template's last end-of-turn token in it (ChatML's newline after
        `<|im_end|>` is not supervised). Templates that do not render a conversation's prefixes as text
        prefixes are rejected rather than mislabelled; a template that raises (e.g. on a role it does not
        support) is a DataError naming the sample.
        """
        result = self.render_many([sample_id], [messages])[0]
        if isinstance(result, DataError):
            raise result
        return result

    def render_many(self, sample_ids: list[str], conversations: list[list[dict]]
                    ) -> list[tuple[str, Spans] | DataError]:
        """`render` for many conversations with two batched template calls (every prefix of every
        conversation at once) instead of 1 + 2 per answer each: the same strings, less overhead. A
        conversation that ends with an answer is its own last prefix. When the template raises, each
        conversation is rendered alone so the error lands on its own sample."""
        from jinja2 import TemplateError

        source = self.template.source
        if not conversations:
            return []
        throughs, befores, plan = [], [], []
        for messages in conversations:
            answers = [idx for idx, message in enumerate(messages) if message["role"] == "assistant"]
            ends_with_answer = bool(answers) and answers[-1] == len(messages) - 1
            plan.append((len(throughs), len(befores), len(answers), ends_with_answer))
            throughs += [messages[:idx + 1] for idx in answers] + ([] if ends_with_answer else [messages])
            befores += [messages[:idx] for idx in answers]
        try:
            throughs = render(self.processor, throughs, source)
            befores = render(self.processor, befores, source, add_generation_prompt=True) if befores else []
        except (TemplateError, TypeError) as exc:
            if len(conversations) > 1:
                return [self.render_many([sample_id], [messages])[0]
                        for sample_id, messages in zip(sample_ids, conversations)]
            return [DataError(f"sample {quote(sample_ids[0])}: the chat template rejected it: {shorten(str(exc))}")]
        results: list[Any] = []
        for sample_id, (at, before_at, num_answers, ends_with_answer) in zip(sample_ids, plan):
            answer_texts = throughs[at:at + num_answers]
            text = answer_texts[-1] if ends_with_answer else throughs[at + num_answers]
            spans = []
            for before, through in zip(befores[before_at:before_at + num_answers], answer_texts):
                if not (through.startswith(before) and text.startswith(through)):
                    spans = DataError(f"sample {quote(sample_id)}: the chat template does not render conversation "
                                      "prefixes as text prefixes, so the assistant spans cannot be found")
                    break
                spans.append((len(before), self._answer_end(through, len(before))))
            results.append(spans if isinstance(spans, DataError) else (text, spans))
        return results

    def render_texts(self, conversations: list[list[dict]]) -> list[str | None]:
        """Each whole conversation's text, in one template call; None where the template rejects it (the
        batch is then rendered one conversation at a time, so one bad conversation does not hide the rest)."""
        from jinja2 import TemplateError

        try:
            return render(self.processor, conversations, self.template.source)
        except (TemplateError, TypeError):
            texts: list[str | None] = []
            for conversation in conversations:
                try:
                    texts += render(self.processor, [conversation], self.template.source)
                except (TemplateError, TypeError):
                    texts.append(None)
            return texts

    def _answer_end(self, through: str, start: int) -> int:
        """Where an answer's span ends: after the last end-of-turn token in `through[start:]`, else its end."""
        ends = [through.rfind(token, start) + len(token) for token in self.template.end_of_turn
                if through.rfind(token, start) >= 0]
        return max(ends) if ends else len(through)


__all__ = ["ChatRenderer", "Spans"]
