"""Who is told what, on which channel: an issued action → the messages for the outbox. Pure.

The action's ``addressed`` roles resolve to people through the directory by role *and* county,
never by name: a county role (responsible person, unit leader) means that county's entry, a city
role (supervision bureau, city bureau) the city-level entries (no county). So 南乐县's reminder
reaches 410923-liu-bing (刘冰) and 清丰县's 410922-liu-bing (刘兵).

Each person gets one message per enabled channel that reaches them: SMS when they have a mobile
(through the level's approved template), e-mail when they have an address, the file channel (the
demo's stand-in for SMS) always, the webhook when one is configured. A message's id is
:func:`~services.notifier.delivery.message_id` of (action, recipient, channel): planning the same
action again, after a redelivery, gives the same messages with the same ids.

:func:`preflight` checks beforehand that this can work: every role any level can address resolves
in every county to someone reachable, every level has its SMS template, every backup exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import msgspec

from contracts.directory import Contact, ContactRole, Directory
from contracts.events import ActionIssued
from contracts.policy import Policy
from contracts.programme import Programme
from services.notifier.channels.base import OutboundMessage
from services.notifier.delivery import (
    DIGEST_TEMPLATE_KEY,
    Channel,
    NotifierSettings,
    address_for,
    message_id,
)
from services.notifier.templates import (
    CITY_ROLES,
    city_contacts,
    email_body,
    email_subject,
    sms_params,
    sms_text,
)

__all__ = [
    "Gap",
    "Severity",
    "message_id",
    "plan",
    "preflight",
    "recipients",
]


def _role(value: str) -> ContactRole | None:
    try:
        return ContactRole(value)
    except ValueError:
        return None


def people_in_role(directory: Directory, role: ContactRole, county_code: str) -> list[Contact]:
    """The people holding ``role`` for ``county_code`` (city roles: the city-level entries)."""
    scope = None if role in CITY_ROLES else county_code
    return [p for p in directory.people if role in p.roles and p.county_code == scope]


def recipients(addressed: Iterable[str], county_code: str, directory: Directory) -> list[Contact]:
    """The people an action addressed to ``addressed`` roles in ``county_code`` reaches, once each,
    in the order of the roles and then of the directory. Unknown roles resolve to nobody (preflight
    reports them)."""
    found: dict[str, Contact] = {}
    for value in addressed:
        role = _role(value)
        if role is None:
            continue
        for person in people_in_role(directory, role, county_code):
            found.setdefault(person.id, person)
    return list(found.values())


def plan(
    action: ActionIssued,
    programme_id: str,
    county_code: str,
    county_name: str,
    directory: Directory,
    settings: NotifierSettings,
) -> list[OutboundMessage]:
    """The messages telling the addressed people of ``action``: one per (person, reachable channel).

    ``programme_id`` is part of the action's id already; it is accepted so callers state it and for
    future per-programme templates. An SMS needs the level's approved template: without one the
    SMS is not planned (the e-mail still is) and :func:`preflight` lists the gap.
    """
    del programme_id  # the action id carries it
    contacts = city_contacts(directory)
    subject = email_subject(action, county_name)
    messages: list[OutboundMessage] = []
    for person in recipients(action.addressed, county_code, directory):
        for channel in settings.channels:
            message = _message(action, county_name, person, channel, subject, contacts, settings)
            if message is not None:
                messages.append(message)
    return messages


def _message(
    action: ActionIssued,
    county_name: str,
    person: Contact,
    channel: Channel,
    subject: str,
    contacts: Sequence[Contact],
    settings: NotifierSettings,
) -> OutboundMessage | None:
    address = address_for(person, channel, settings)
    if address is None:
        return None
    template: str | None = None
    params: dict[str, str] = {}
    if channel == "sms":
        template = settings.sms_templates.get(action.level_id)
        if not template:
            return None
        params = sms_params(action, county_name)
    body = (
        email_body(action, county_name, person, contacts)
        if channel in ("email", "webhook")
        else sms_text(action, county_name)
    )
    return OutboundMessage(
        message_id=message_id(action.action_id, person.id, channel),
        channel=channel,
        recipient_id=person.id,
        address=address,
        subject=subject,
        body=body,
        sms_template_code=template,
        sms_template_params=params,
        urgent=action.urgent,
    )


# -- preflight -----------------------------------------------------------------------------------
Severity = Literal["error", "warning"]


class Gap(msgspec.Struct, frozen=True, kw_only=True):
    """One thing that keeps a notification from reaching someone.

    ``error``: someone the policy addresses cannot be reached at all (or an SMS level has no
    template); ``warning``: they can, but not on every enabled channel.
    """

    severity: Severity
    what: str  # no_person | no_channel | no_mobile | no_email | no_sms_template | no_webhook_url |
    #            unknown_role | unknown_backup | backup_cycle | unreachable_backup | not_responsible
    detail: str  # names ids and roles, never an address
    county_code: str | None = None
    role: str | None = None
    person_id: str | None = None
    level_id: str | None = None


def preflight(
    programmes: Programme | Sequence[Programme],
    policies: Policy | Sequence[Policy],
    directory: Directory,
    settings: NotifierSettings,
) -> list[Gap]:
    """Every gap between what the policies can address and what the directory and settings reach.

    County roles are checked for every county of every programme, city roles once; SMS templates
    for every level (and the digest) when SMS is enabled; backups for every person.
    """
    programme_list = [programmes] if isinstance(programmes, Programme) else list(programmes)
    policy_list = [policies] if isinstance(policies, Policy) else list(policies)
    gaps: list[Gap] = []
    roles: list[str] = []
    for policy in policy_list:
        for level in policy.levels:
            roles += [r.value for r in level.addressed if r.value not in roles]
    counties: dict[str, str] = {}
    for programme in programme_list:
        for county in programme.counties:
            counties.setdefault(county.code, county.name)
            gaps += _responsible_person_gaps(programme.id, county.code, county.responsible_person.id, directory)

    checked: set[str] = set()
    for value in roles:
        role = _role(value)
        if role is None:
            gaps.append(Gap(severity="error", what="unknown_role", role=value, detail=f"unknown role {value!r}"))
            continue
        scopes: list[str | None] = [None] if role in CITY_ROLES else list(counties)
        for scope in scopes:
            people = people_in_role(directory, role, scope or "")
            where = f"{scope} {counties[scope]}" if scope else "city"
            if not people:
                gaps.append(
                    Gap(
                        severity="error",
                        what="no_person",
                        county_code=scope,
                        role=value,
                        detail=f"{where}: nobody holds {value}",
                    )
                )
                continue
            for person in people:
                gaps += _reach_gaps(person, scope, value, where, settings)
                checked.add(person.id)

    if "sms" in settings.channels:
        levels: dict[str, str] = {}
        for policy in policy_list:
            for level in policy.levels:
                levels.setdefault(level.id, level.name)
        for level_id, name in levels.items():
            if not settings.sms_templates.get(level_id):
                gaps.append(
                    Gap(
                        severity="error",
                        what="no_sms_template",
                        level_id=level_id,
                        detail=f"level {level_id} ({name}) has no approved SMS template",
                    )
                )
        if not settings.sms_templates.get(DIGEST_TEMPLATE_KEY):
            gaps.append(
                Gap(
                    severity="warning",
                    what="no_sms_template",
                    level_id=DIGEST_TEMPLATE_KEY,
                    detail="the daily digest has no approved SMS template (over-budget SMS fall back to e-mail)",
                )
            )
    if "webhook" in settings.channels and not settings.webhook_url:
        gaps.append(Gap(severity="error", what="no_webhook_url", detail="webhook enabled but webhook_url is not set"))

    gaps += _backup_gaps(directory, settings, addressed=checked)
    return gaps


def _responsible_person_gaps(programme_id: str, county_code: str, person_id: str, directory: Directory) -> list[Gap]:
    person = directory.person(person_id)
    if person is not None and person.county_code == county_code and ContactRole.RESPONSIBLE_PERSON in person.roles:
        return []
    return [
        Gap(
            severity="warning",
            what="not_responsible",
            county_code=county_code,
            role=ContactRole.RESPONSIBLE_PERSON.value,
            person_id=person_id,
            detail=(
                f"{programme_id} names {person_id} as {county_code}'s responsible person; "
                "the directory does not list them so"
            ),
        )
    ]


def _reach_gaps(person: Contact, scope: str | None, role: str, where: str, settings: NotifierSettings) -> list[Gap]:
    reachable = [c for c in settings.channels if _reaches(person, c, settings)]
    if not reachable:
        return [
            Gap(
                severity="error",
                what="no_channel",
                county_code=scope,
                role=role,
                person_id=person.id,
                detail=f"{where}: {role} {person.id} has no working channel of {', '.join(settings.channels)}",
            )
        ]
    gaps = []
    for channel in settings.channels:
        if channel in ("sms", "email") and channel not in reachable:
            what = "no_mobile" if channel == "sms" else "no_email"
            gaps.append(
                Gap(
                    severity="warning",
                    what=what,
                    county_code=scope,
                    role=role,
                    person_id=person.id,
                    detail=f"{where}: {role} {person.id} has no {'mobile' if channel == 'sms' else 'e-mail'}",
                )
            )
    return gaps


def _reaches(person: Contact, channel: Channel, settings: NotifierSettings) -> bool:
    return address_for(person, channel, settings) is not None


def _backup_gaps(directory: Directory, settings: NotifierSettings, addressed: set[str]) -> list[Gap]:
    """Every backup exists, no chain loops, and the backup of an addressed person is reachable."""
    gaps: list[Gap] = []
    for person in directory.people:
        if person.backup is None:
            continue
        backup = directory.person(person.backup)
        if backup is None or backup.id == person.id:
            gaps.append(
                Gap(
                    severity="error",
                    what="unknown_backup",
                    county_code=person.county_code,
                    person_id=person.id,
                    detail=f"{person.id}'s backup {person.backup} is not in the directory",
                )
            )
            continue
        seen = [person.id]
        current: Contact | None = backup
        while current is not None and current.id not in seen:
            seen.append(current.id)
            current = directory.person(current.backup) if current.backup else None
        if current is not None:
            gaps.append(
                Gap(
                    severity="warning",
                    what="backup_cycle",
                    county_code=person.county_code,
                    person_id=person.id,
                    detail=f"the backup chain of {person.id} loops: {' → '.join([*seen, current.id])}",
                )
            )
        if person.id in addressed and not any(_reaches(backup, c, settings) for c in settings.channels):
            gaps.append(
                Gap(
                    severity="warning",
                    what="unreachable_backup",
                    county_code=person.county_code,
                    person_id=person.id,
                    detail=f"{person.id}'s backup {backup.id} has no working channel",
                )
            )
    return gaps
