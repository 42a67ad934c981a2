"""The directory file: people, their roles and how to reach them (format ``duban.directory/v1``).

Contacts are not in the notice and change more often than the programme, so they live in their
own file an operator edits. People are addressed by id and role, never by name.
"""

from __future__ import annotations

import enum
from importlib import resources
from pathlib import Path
from typing import Annotated

import msgspec

from contracts.identifiers import CountyCode, PersonId, normalise_name
from contracts.programme import Programme, Spec
from contracts.yamlfile import DataFileError, load_yaml_struct

DIRECTORY_FORMAT = "duban.directory/v1"

# Mainland China mobile numbers in E.164 form.
MainlandMobile = Annotated[str, msgspec.Meta(pattern=r"^\+861[3-9][0-9]{9}$")]
Email = Annotated[str, msgspec.Meta(pattern=r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$", max_length=254)]


class ContactRole(enum.StrEnum):
    RESPONSIBLE_PERSON = "responsible_person"  # 责任人 named in the ledger
    UNIT_LEADER = "unit_leader"  # 责任单位 (county government) leader
    SUPERVISION_BUREAU = "supervision_bureau"  # 市委市政府督查局
    CITY_BUREAU = "city_bureau"  # 市城管综合执法局


class Contact(Spec, frozen=True):
    id: PersonId
    name: str
    roles: tuple[ContactRole, ...]
    county_code: CountyCode | None = None  # None for city-level people
    mobile: MainlandMobile | None = None
    email: Email | None = None
    backup: PersonId | None = None  # who receives when this person cannot be reached


class Directory(Spec, frozen=True):
    format: str
    people: tuple[Contact, ...]

    def person(self, person_id: str) -> Contact | None:
        return next((p for p in self.people if p.id == person_id), None)


class DirectoryFileError(DataFileError):
    pass


def example_directory_path(programme_id: str = "puyang-2017-13") -> Path:
    return Path(str(resources.files("contracts") / "programmes" / f"{programme_id}.directory.example.yaml"))


def load_directory(path: Path | str, programme: Programme | None = None) -> Directory:
    """Read and validate a directory file; with a programme, check it names its people."""
    path = Path(path)
    directory, locate = load_yaml_struct(path, Directory, DirectoryFileError)
    people = tuple(msgspec.structs.replace(p, name=normalise_name(p.name)) for p in directory.people)
    directory = msgspec.structs.replace(directory, people=people)

    def fail(key: str, message: str) -> DirectoryFileError:
        return DirectoryFileError(path, locate(key), key, message)

    if directory.format != DIRECTORY_FORMAT:
        raise fail("$.format", f"expected {DIRECTORY_FORMAT!r}, got {directory.format!r}")
    ids = [p.id for p in people]
    for i, person in enumerate(people):
        if ids.index(person.id) != i:
            raise fail(f"$.people[{i}].id", f"person id {person.id!r} appears twice")
        if person.backup is not None and person.backup not in ids:
            raise fail(f"$.people[{i}].backup", f"unknown person {person.backup!r}")
        if person.backup == person.id:
            raise fail(f"$.people[{i}].backup", "a person cannot be their own backup")
        if not person.roles:
            raise fail(f"$.people[{i}].roles", "at least one role")
    if programme is not None:
        for county in programme.counties:
            listed = directory.person(county.responsible_person.id)
            if listed is None:
                raise fail("$.people", f"no entry for {county.responsible_person.id} ({county.name} 责任人)")
            if listed.county_code != county.code or listed.name != county.responsible_person.name:
                raise fail(
                    f"$.people[{ids.index(listed.id)}]",
                    f"{listed.id} is {county.responsible_person.name} of {county.code} in the programme",
                )
    return directory
