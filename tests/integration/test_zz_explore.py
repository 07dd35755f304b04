from __future__ import annotations

import time

from server.procedures import ProcedureManager


async def test_explore(service, tmp_path) -> None:
    wh = service.warehouse
    for q in [
        "CREATE OR REPLACE PROCEDURE `test-project.organizations.sp_x1`(p NOTATYPE)\nBEGIN\n  SELECT 1;\nEND\n",
        "CREATE OR REPLACE PROCEDURE `test-project.organizations.sp_x2`(p INT64\nBEGIN\n  SELECT 1;\nEND\n",
        "CREATE OR REPLACE PROCEDURE `test-project.organizations.sp_x3`()\nBEGIN\n  SELECT 1;\n",
        "CREATE OR REPLACE PROCEDURE `test-project.organizations.sp_x4`() BEGIN SELECT 1; END END",
        "CREATE OR REPLACE PROCEDURE `test-project.organizations.sp_x5`() BEGN SELECT 1; END",
        "CREATE OR REPLACE PROCEDURE `test-project.organizations.sp_x6`(,) BEGIN SELECT 1; END",
    ]:
        t = time.monotonic()
        try:
            print(await wh.query(q))
        except Exception as exc:
            print("ERR", repr(exc), repr(exc.__cause__))
        print("took", time.monotonic() - t)
    print([r.name for r in await wh.list_routines("organizations")])
    assert False
