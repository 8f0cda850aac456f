"""Reply controls on Discord: buttons (Stop, Regenerate, Continue) on a reply's last message, and
what a press does. `DiscordAdapter` inherits `DiscordControls`.

A button's custom_id names its control and its job (`parley:stop:42`), so a press names its reply
without any state in this process: the buttons are a `discord.ui.DynamicItem` registered with
`client.add_dynamic_items` at start, and a press on a message posted before a restart is handled
like any other (the view has no timeout). A press becomes a `ControlPress` for `Core.press`; the
interaction is answered privately (ephemeral) when the core has something to say to the presser,
and acknowledged silently (a deferred update) otherwise, so the client never shows "interaction
failed". Removing an older reply's buttons (`clear_controls`) edits its messages to none.
"""

# No `from __future__ import annotations` here, like the other Discord modules: discord.py reads
# some annotations at runtime.

import asyncio
import logging
import re
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Optional

import discord

from bot.conversation import messages
from bot.core.contracts import Control, ControlPress, RouteResult
from bot.core.types import Author, ConversationKey

from .base import Core
from .discord_commands import NO_PINGS

if TYPE_CHECKING:
    from bot.core.config import DiscordSettings

log = logging.getLogger("parley.discord")

CUSTOM_ID = re.compile(r"parley:(?P<action>stop|regen|cont):(?P<job>[0-9]{1,18})")
"""A control button's custom_id: what it does and the job whose reply it is on."""
ACTION_OF = {Control.STOP: "stop", Control.REGENERATE: "regen", Control.CONTINUE: "cont"}
CONTROL_OF = {action: control for control, action in ACTION_OF.items()}
BUTTON_STYLE = {
    Control.STOP: ("Stop", discord.ButtonStyle.danger),
    Control.REGENERATE: ("Regenerate", discord.ButtonStyle.secondary),
    Control.CONTINUE: ("Continue", discord.ButtonStyle.primary),
}
BUTTON_TYPE = discord.ComponentType.button.value

UNKNOWN_BUTTON = "That button does nothing any more."
"""Discord's own words, for a button whose custom_id Parley does not make (another version's, a
garbled one): the core never sees such a press."""


def custom_id(control: Control, job_id: int) -> str:
    return f"parley:{ACTION_OF[control]}:{job_id}"


class ControlButton(discord.ui.DynamicItem[discord.ui.Button], template=CUSTOM_ID):
    """One control's button; rebuilt by discord.py from the custom_id of every press."""

    def __init__(self, control: Control, job_id: int) -> None:
        label, style = BUTTON_STYLE[control]
        super().__init__(discord.ui.Button(label=label, style=style, custom_id=custom_id(control, job_id)))
        self.control = control
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item, match: "re.Match[str]", /
    ) -> "ControlButton":
        return cls(CONTROL_OF[match["action"]], int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        adapter = getattr(interaction.client, "adapter", None)
        if isinstance(adapter, DiscordControls):
            await adapter._on_press(interaction, self.control, self.job_id)


def controls_view(job_id: Optional[int], controls: Sequence[Control]) -> Optional[discord.ui.View]:
    """The buttons for `controls` on job `job_id`'s reply; None (no components) when there are none."""
    if job_id is None or not controls:
        return None
    view = discord.ui.View(timeout=None)
    for control in dict.fromkeys(controls):
        view.add_item(ControlButton(control, job_id))
    return view


def _shows_component(message: Optional[discord.Message], component_type: int, wanted: str) -> bool:
    """Whether `message` carries the component pressed (discord.py's DynamicItem dispatch needs it)."""
    if message is None:
        return False
    stack: list[Any] = list(message.components)
    while stack:
        component = stack.pop()
        stack.extend(getattr(component, "children", ()) or ())
        if getattr(component, "custom_id", None) == wanted and component.type.value == component_type:
            return True
    return False


class DiscordControls:
    """The reply-controls half of `DiscordAdapter` (which provides the attributes declared here)."""

    config: "DiscordSettings"
    core: Optional[Core]
    client: Optional[discord.Client]

    def _conversation(self, channel_id: int) -> ConversationKey:
        raise NotImplementedError

    def _is_admin(self, user: object, permissions: Optional[discord.Permissions], direct: bool) -> bool:
        raise NotImplementedError

    def _answer_within(self) -> float:
        raise NotImplementedError

    async def _channel(self, channel_id: int) -> discord.abc.Messageable:
        raise NotImplementedError

    def channel_lock(self, channel_id: int) -> AbstractAsyncContextManager[None]:
        raise NotImplementedError

    async def clear_controls(self, conversation: ConversationKey, message_ids: Sequence[str]) -> None:
        """Remove the buttons of an older reply's messages. Best effort: a message gone is no error."""
        ids = [int(i) for i in message_ids if str(i).isdigit()]
        if not ids or not conversation.key.isdigit() or self.client is None:
            return
        try:
            channel = await self._channel(int(conversation.key))
        except discord.HTTPException as exc:
            log.info("Discord: could not reach channel %s to remove buttons: %s", conversation.key, exc)
            return
        for message_id in ids:
            try:
                await channel.get_partial_message(message_id).edit(view=None)  # type: ignore[attr-defined]
            except discord.NotFound:
                continue
            except discord.HTTPException as exc:
                log.info("Discord: could not remove the buttons of message %s: %s", message_id, exc)

    async def _on_component(self, interaction: discord.Interaction) -> None:
        """Every interaction: a component press that no `ControlButton` will take (a custom_id
        Parley does not make, or one its message no longer shows) is answered here."""
        if interaction.type is not discord.InteractionType.component:
            return
        data: Any = interaction.data if isinstance(interaction.data, dict) else {}
        wanted = data.get("custom_id")
        component_type = data.get("component_type")
        match = CUSTOM_ID.fullmatch(wanted) if isinstance(wanted, str) else None
        if match is None or component_type != BUTTON_TYPE:
            await self._answer_privately(interaction, UNKNOWN_BUTTON)
            return
        if _shows_component(interaction.message, component_type, wanted):
            return  # the ControlButton discord.py builds from the custom_id answers it
        await self._on_press(interaction, CONTROL_OF[match["action"]], int(match["job"]))

    async def _on_press(self, interaction: discord.Interaction, control: Control, job_id: int) -> None:
        """A control pressed: ask the core, then answer the presser (never left unanswered)."""
        try:
            if self.core is None or interaction.channel_id is None:
                await self._answer_privately(interaction, UNKNOWN_BUTTON)
                return
            direct = interaction.guild_id is None
            user = interaction.user
            press = ControlPress(
                conversation=self._conversation(interaction.channel_id),
                job_id=job_id,
                control=control,
                author=Author(
                    id=str(user.id),
                    name=user.display_name,
                    is_admin=self._is_admin(user, interaction.permissions, direct),
                ),
                press_id=str(interaction.id),
                is_direct=direct,
            )
            task = asyncio.ensure_future(self._press_in_order(self.core, press, interaction.channel_id))
            done, _ = await asyncio.wait({task}, timeout=self._answer_within())
            if not done:
                await interaction.response.defer()  # a component's deferral: no "thinking" message
            result = await task
            await self._answer_privately(interaction, _sentence_for(result))
        except Exception:
            log.exception("Discord: could not handle a %s press on job %s", control.value, job_id)
            try:
                await self._answer_privately(interaction, messages.UNEXPECTED_ERROR)
            except discord.HTTPException as exc:
                log.info("Discord: could not answer a failed press: %s", exc)

    async def _press_in_order(self, core: Core, press: ControlPress, channel_id: int) -> RouteResult:
        # One channel's presses and messages reach the core one at a time, in the order they came
        # (a double tap is two presses at once: the second must see what the first did).
        async with self.channel_lock(channel_id):
            return await core.press(press)

    async def _answer_privately(self, interaction: discord.Interaction, sentence: Optional[str]) -> None:
        """Say `sentence` to the presser alone, or acknowledge the press silently when None."""
        try:
            if interaction.response.is_done():
                if sentence:
                    await interaction.followup.send(sentence, ephemeral=True, allowed_mentions=NO_PINGS)
            elif sentence:
                await interaction.response.send_message(sentence, ephemeral=True, allowed_mentions=NO_PINGS)
            else:
                await interaction.response.defer()
        except discord.HTTPException as exc:  # acknowledged already (a redelivered press), or expired
            log.info("Discord: could not answer interaction %s: %s", interaction.id, exc)


def _sentence_for(result: RouteResult) -> Optional[str]:
    if result.reply:
        return result.reply
    if result.refusal is not None:
        try:
            return messages.render_refusal(result.refusal)
        except ValueError:
            return None
    return None
