"""The orders service's tables, and the data the system starts with.

Three tables, named ``ch07_…`` so that on a shared PostgreSQL (``DATABASE_URL``) the chapter creates
and drops only its own. The data is the same for every seed: 200 products, 12 customers with 250
orders each (the account pages list them), two lines an order.
"""

from __future__ import annotations

from sqlalchemy import ForeignKey, String, insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "CURRENCIES",
    "CUSTOMERS",
    "HOT_PRODUCTS",
    "PRODUCTS",
    "Base",
    "Order",
    "OrderLine",
    "Product",
    "create_tables",
    "in_currency",
]

PRODUCTS = 200
HOT_PRODUCTS = 40  # the products most pages show: the shop's reads and price changes go to these
CUSTOMERS = 12
ORDERS_PER_CUSTOMER = 250
CURRENCIES = {"USD": 1.0, "EUR": 0.92}  # price in a currency = price_cents × rate, rounded


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "ch07_products"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80))
    price_cents: Mapped[int]
    weight_grams: Mapped[int]


class Order(Base):
    __tablename__ = "ch07_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str] = mapped_column(String(40), index=True)
    email: Mapped[str] = mapped_column(String(80))
    total_cents: Mapped[int]
    lines: Mapped[list[OrderLine]] = relationship(back_populates="order")


class OrderLine(Base):
    __tablename__ = "ch07_order_lines"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("ch07_orders.id"), index=True)
    product_id: Mapped[int]
    quantity: Mapped[int]
    price_cents: Mapped[int]
    order: Mapped[Order] = relationship(back_populates="lines")


def in_currency(price_cents: int, currency: str) -> int:
    """A price in ``currency``, in its cents (the shop stores USD cents)."""
    return round(price_cents * CURRENCIES[currency])


async def create_tables(engine: AsyncEngine) -> None:
    """Drop and create the chapter's tables, and fill them with the starting data."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
        products = [
            {
                "id": i,
                "name": f"product {i}",
                "price_cents": 1000 + 10 * i,
                "weight_grams": 200 + (i * 37) % 1800,
            }
            for i in range(1, PRODUCTS + 1)
        ]
        await conn.execute(insert(Product), products)
        orders, lines = [], []
        for c in range(CUSTOMERS):
            for n in range(ORDERS_PER_CUSTOMER):
                first, second = 1 + (c * 7 + n) % PRODUCTS, 1 + (c * 11 + 3 * n) % PRODUCTS
                pair = [(first, 1, 1000 + 10 * first), (second, 2, 1000 + 10 * second)]
                total = sum(quantity * price for _, quantity, price in pair)
                orders.append(
                    {"customer": f"customer-{c}", "email": f"customer-{c}@example.com", "total_cents": total}
                )
                lines.append(pair)
        # The database numbers the orders (on PostgreSQL, explicit IDs would leave its sequence behind).
        ids = await conn.scalars(insert(Order).returning(Order.id, sort_by_parameter_order=True), orders)
        await conn.execute(
            insert(OrderLine),
            [
                {"order_id": order_id, "product_id": product, "quantity": quantity, "price_cents": price}
                for order_id, pair in zip(ids.all(), lines, strict=True)
                for product, quantity, price in pair
            ],
        )
