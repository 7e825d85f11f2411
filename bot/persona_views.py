"""Buttons that outlive a restart: cancelling a training job and voting in a blind test (ids carry their state)."""

from __future__ import annotations

import re
from typing import Any

import discord

from bot.errorhook import reports_errors
from bot.errors import NotAllowed, NotAvailable
from bot.services import Services, cancel_training, job_state


def services_of(interaction: discord.Interaction) -> Services:
    """The services of the client that received the interaction."""
    return interaction.client.services  # type: ignore[attr-defined,no-any-return]


class CancelJobButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"doppel:job:cancel:(?P<job>[A-Za-z0-9_-]{1,64})"):
    """Cancel a training job; allowed for whoever requested it, the member it trains, and server admins."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            discord.ui.Button(
                label="Cancel training", style=discord.ButtonStyle.danger, custom_id=f"doppel:job:cancel:{job_id}"
            )
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> CancelJobButton:
        return cls(match["job"])

    @reports_errors
    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        services = services_of(interaction)
        job = await job_state(services, self.job_id)
        if job is None:
            raise NotAvailable("that training job no longer exists")
        who = str(interaction.user.id)
        if who not in (job.requested_by, job.member_id) and not interaction.permissions.manage_guild:
            raise NotAllowed("only the member, whoever started the job, or an admin can cancel it")
        if job.status.final:
            await interaction.followup.send(f"That job already ended ({job.status.value}).", ephemeral=True)
            return
        await cancel_training(services, self.job_id, by=who)
        await interaction.followup.send("Cancelling the training job…", ephemeral=True)


class GuessVoteButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"doppel:guess:(?P<test>[0-9a-f]{32}):(?P<label>[AB])"
):
    """'A is real' / 'B is real' on a blind test; one vote per member, the persona's own member excluded."""

    def __init__(self, test_id: str, label: str) -> None:
        super().__init__(
            discord.ui.Button(
                label=f"{label} is the real one", style=discord.ButtonStyle.primary,
                custom_id=f"doppel:guess:{test_id}:{label}",
            )  # fmt: skip
        )
        self.test_id = test_id
        self.label = label

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> GuessVoteButton:
        return cls(match["test"], match["label"])

    @reports_errors
    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        services = services_of(interaction)
        test = await services.blind_test(self.test_id)
        if test is None:
            raise NotAvailable("this blind test was deleted (its member erased their data)")
        if str(interaction.user.id) == test["member_id"]:
            raise NotAllowed("you wrote the real one: your own vote would not tell us anything")
        right = await services.blind_vote(self.test_id, str(interaction.user.id), self.label)
        if right is None:
            await interaction.followup.send("You already voted on this test (one vote each).", ephemeral=True)
            return
        from bot.guess import results_line

        totals = await services.blind_results(test["member_id"], adapter_id=test["adapter_id"])
        verdict = "right: that one is real" if right else f"fooled: {test['real_label']} was the real one"
        await interaction.followup.send(f"Vote recorded. You were {verdict}.\n{results_line(totals)}", ephemeral=True)


def dynamic_items() -> tuple[type[discord.ui.DynamicItem[Any]], ...]:
    """The dynamic buttons the client registers at startup."""
    return (CancelJobButton, GuessVoteButton)
