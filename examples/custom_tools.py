"""Custom tools with pydantic models and dependencies, and how to test them without a model.

Tools receive the caller's dependencies through ``RunContext`` (as in PydanticAI): here an
in-memory order database and the current user. The agent is driven by ``ScriptedEngine``,
the test helper that writes the calls you script and checks each against the same grammar
the real engine denoises under; swap in ``DiffusionEngine.from_pretrained(...)`` for a model.

    python examples/custom_tools.py
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from agentloop import Agent, RunContext, tool
from agentloop.testing import ScriptedEngine, call


class Item(BaseModel):
    sku: Annotated[str, Field(pattern=r"^[A-Z]{3}-[0-9]{3}$", description="Catalogue number, e.g. TEA-001")]
    quantity: Annotated[int, Field(ge=1, le=20)] = 1


@dataclass
class Shop:
    user: str
    orders: dict[int, list[Item]] = field(default_factory=dict)


@tool
def place_order(ctx: RunContext[Shop], items: list[Item], shipping: Literal["standard", "express"] = "standard") -> str:
    """Place an order for the current user.

    Args:
        items: What to order (1 to 20 of each).
        shipping: How fast to ship.
    """
    order_id = len(ctx.deps.orders) + 1
    ctx.deps.orders[order_id] = items
    total = sum(i.quantity for i in items)
    return f"order {order_id} for {ctx.deps.user}: {total} item(s), {shipping} shipping"


@tool
def order_status(ctx: RunContext[Shop], order_id: int) -> str:
    """Status of an order.

    Args:
        order_id: The number returned by place_order.
    """
    if order_id not in ctx.deps.orders:
        raise KeyError(f"no order {order_id}")
    return f"order {order_id}: packed"


def main() -> None:
    shop = Shop(user="ada")
    engine = ScriptedEngine([
        call("place_order", items=[{"sku": "TEA-001", "quantity": 2}, {"sku": "CUP-010"}], shipping="express"),
        call("order_status", order_id=1),
        "Your order 1 (2 teas, 1 cup) is packed and ships express.",
    ])
    agent = Agent(engine, [place_order, order_status], instructions="You run a tea shop.")
    result = agent.run_sync("Two teas and a cup, express please, and tell me when it's packed.", deps=shop)
    for c in result.calls:
        print(f"{c.call.name}({c.call.arguments}) -> {c.result.content}")
    print("answer:", result.output)
    print("orders:", {k: [i.model_dump() for i in v] for k, v in shop.orders.items()})
    print("the model reads these schemas:", place_order.parameters["$defs"]["Item"])


if __name__ == "__main__":
    main()
