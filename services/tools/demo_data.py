"""A deterministic, realistic demo data set for the CRM, billing and knowledge-base stores.

Seeded RNG + a fixed anchor date: every build generates the same ~200 customers with
accounts, contacts, tickets and interactions; subscriptions with plan changes; six months
of invoices including failed payments and double charges; and the help-center articles.
Three showcase customers always exist for demos:

* ``CUST-0001``: the latest invoice was charged twice;
* ``CUST-0002``: the latest payment failed, the account is past due;
* ``CUST-0003``: upgraded mid-period, with a proration invoice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from services.tools.adapters.kb import Article
from services.tools.kb_articles import PLANS, build_articles

ANCHOR = datetime(2025, 6, 24, 9, 0, tzinfo=UTC)
SEED = 20250601
CUSTOMER_COUNT = 200
MONTHS_OF_INVOICES = 6

_FIRST = [
    "Olivia",
    "Liam",
    "Emma",
    "Noah",
    "Ava",
    "Oliver",
    "Sophia",
    "Elijah",
    "Isabella",
    "James",
    "Mia",
    "William",
    "Amelia",
    "Benjamin",
    "Harper",
    "Lucas",
    "Evelyn",
    "Henry",
    "Abigail",
    "Theodore",
    "Emily",
    "Jack",
    "Ella",
    "Levi",
    "Elizabeth",
    "Alexander",
    "Camila",
    "Jackson",
    "Luna",
    "Mateo",
    "Sofia",
    "Daniel",
    "Avery",
    "Michael",
    "Mila",
    "Mason",
    "Aria",
    "Sebastian",
    "Scarlett",
    "Ethan",
    "Priya",
    "Arjun",
    "Yuki",
    "Hiro",
    "Fatima",
    "Omar",
    "Ingrid",
    "Lars",
    "Chloe",
    "Hugo",
    "Zoe",
    "Felix",
    "Nina",
    "Jonas",
    "Aisha",
    "Kwame",
]
_LAST = [
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Patel",
    "Nguyen",
    "Kim",
    "Schmidt",
    "Muller",
    "Rossi",
    "Dubois",
    "Jansen",
    "Kowalski",
    "Novak",
    "Silva",
    "Tanaka",
    "Okafor",
    "Larsen",
    "Berg",
]
_COMPANY_A = [
    "Blue",
    "Bright",
    "Cedar",
    "Summit",
    "North",
    "Silver",
    "Green",
    "Red",
    "Iron",
    "Clear",
    "Swift",
    "Golden",
    "Pine",
    "Harbor",
    "Maple",
    "Apex",
    "Atlas",
    "Nova",
    "Orbit",
    "Pioneer",
    "Quantum",
    "River",
    "Stone",
    "Sun",
    "Vertex",
    "Willow",
]
_COMPANY_B = [
    "Labs",
    "Works",
    "Logistics",
    "Studio",
    "Analytics",
    "Health",
    "Foods",
    "Media",
    "Systems",
    "Partners",
    "Robotics",
    "Dynamics",
    "Ventures",
    "Energy",
    "Design",
    "Networks",
    "Retail",
    "Capital",
    "Learning",
    "Travel",
]
_COMPANY_SUFFIX = ["Inc", "Ltd", "GmbH", "LLC", "BV", "Co", "SAS", "Pty"]
_COUNTRIES = [("US", "USD"), ("GB", "GBP"), ("DE", "EUR"), ("FR", "EUR"), ("CA", "USD"),
              ("AU", "USD"), ("NL", "EUR"), ("IN", "USD")]  # fmt: skip
_AGENTS = ["Dana Whitfield", "Marco Bellini", "Sara Lindqvist", "Tom Okoro", "Keiko Mori",
           "Rahul Mehta"]  # fmt: skip
_CONTACT_ROLES = ["Billing admin", "IT administrator", "Finance manager", "Operations lead",
                  "Project manager"]  # fmt: skip
_CARD_BRANDS = ["visa", "mastercard", "amex"]
_FAILURES = ["card_declined", "insufficient_funds", "expired_card", "authentication_required"]

_TICKETS: list[tuple[str, str]] = [
    ("billing", "Charged twice for {month} invoice"),
    ("billing", "Payment failed, card was updated"),
    ("billing", "Need VAT number added to invoices"),
    ("billing", "Question about proration after upgrade"),
    ("billing", "Request refund for unused seats"),
    ("technical", "SSO login fails with error E611"),
    ("technical", "Slack integration stopped posting updates"),
    ("technical", "Webhooks not delivered since {month}"),
    ("technical", "Mobile app crashes on start"),
    ("technical", "API returns 429 Too Many Requests"),
    ("technical", "File upload stuck at 99%"),
    ("technical", "Automations stopped running"),
    ("account", "Transfer workspace ownership"),
    ("account", "Add 10 more seats"),
    ("account", "Export all project data"),
    ("account", "Reset two-factor authentication for a user"),
]
_INTERACTIONS: list[tuple[str, str]] = [
    ("email", "Customer asked how proration works when adding seats; sent the article."),
    ("phone", "Quarterly check-in: team happy with timelines, evaluating automations."),
    ("chat", "Helped the admin reset 2FA for a member who lost their phone."),
    ("email", "Sent renewal reminder and annual billing options."),
    ("chat", "Explained why the card was declined; customer will update the card."),
    ("phone", "Escalation about a duplicate charge; promised a refund of the duplicate."),
    ("email", "Customer requested invoices with their VAT id; explained re-issue process."),
    ("chat", "Walked through SAML SSO setup with Okta; test user signed in."),
    ("phone", "Discussed upgrading to get audit logs and more seats."),
    ("email", "Confirmed webhook endpoint fixed; re-enabled deliveries."),
    ("chat", "Customer reported slowness on a large board; suggested list view and filters."),
    ("email", "Onboarding call scheduled for the new project managers."),
]

_PLAN_SEGMENT = {"Starter": "smb", "Growth": "smb", "Business": "mid_market",
                 "Enterprise": "enterprise"}  # fmt: skip
_PLAN_ORDER = list(PLANS)


@dataclass(frozen=True)
class DemoDataset:
    crm: dict[str, list[dict[str, Any]]]
    billing: dict[str, list[dict[str, Any]]]
    articles: list[Article]

    @property
    def customer_count(self) -> int:
        return len(self.crm["crm_customers"])


def _month_start(moment: datetime, months_back: int) -> datetime:
    year, month = moment.year, moment.month - months_back
    while month <= 0:
        month += 12
        year -= 1
    return moment.replace(year=year, month=month, day=1)


def build_demo_dataset(seed: int = SEED, customers: int = CUSTOMER_COUNT) -> DemoDataset:
    """Generate the whole data set; the same arguments always give the same rows."""
    rng = random.Random(seed)
    crm: dict[str, list[dict[str, Any]]] = {
        "crm_customers": [],
        "crm_accounts": [],
        "crm_contacts": [],
        "crm_tickets": [],
        "crm_interactions": [],
    }
    billing: dict[str, list[dict[str, Any]]] = {
        "billing_accounts": [],
        "billing_subscriptions": [],
        "billing_invoices": [],
        "billing_payments": [],
    }
    emails: set[str] = set()
    counters = {"contact": 0, "ticket": 0, "interaction": 0, "invoice": 0, "payment": 0}

    def next_id(kind: str, prefix: str, width: int) -> str:
        counters[kind] += 1
        return f"{prefix}-{counters[kind]:0{width}d}"

    for n in range(1, customers + 1):
        cid = f"CUST-{n:04d}"
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        name = f"{first} {last}"
        company_core = f"{rng.choice(_COMPANY_A)} {rng.choice(_COMPANY_B)}"
        company = f"{company_core} {rng.choice(_COMPANY_SUFFIX)}"
        domain = company_core.lower().replace(" ", "") + ".example"
        email = f"{first.lower()}.{last.lower()}@{domain}"
        if email in emails:
            email = f"{first.lower()}.{last.lower()}{n}@{domain}"
        emails.add(email)
        country, currency = rng.choice(_COUNTRIES)
        plan = rng.choices(_PLAN_ORDER, weights=[40, 35, 18, 7])[0]
        if n == 3:
            plan = "Business"  # showcase: upgraded from Growth this month
        created = ANCHOR - timedelta(days=rng.randint(200, 1400))
        status = "active" if rng.random() > 0.06 else "churned"
        phone = f"+1-555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
        crm["crm_customers"].append(
            {
                "id": cid,
                "name": name,
                "name_lower": name.lower(),
                "email": email,
                "phone": phone,
                "company": company,
                "segment": _PLAN_SEGMENT[plan],
                "country": country,
                "status": status,
                "created_at": created,
            }
        )
        max_seats = int(PLANS[plan]["seats"])
        seats = rng.randint(max(1, max_seats // 5), max_seats)
        crm["crm_accounts"].append(
            {
                "id": f"ACC-{n:04d}",
                "customer_id": cid,
                "plan": plan,
                "status": "cancelled" if status == "churned" else "active",
                "seats": seats,
                "account_manager": rng.choice(_AGENTS),
                "health_score": rng.randint(35, 98),
                "renewal_date": ANCHOR + timedelta(days=rng.randint(5, 330)),
            }
        )
        crm["crm_contacts"].append(
            {
                "id": next_id("contact", "CON", 5),
                "customer_id": cid,
                "name": name,
                "email": email,
                "role": "Owner",
                "phone": phone,
                "is_primary": 1,
            }
        )
        for _ in range(rng.randint(0, 2)):
            cf, cl = rng.choice(_FIRST), rng.choice(_LAST)
            crm["crm_contacts"].append(
                {
                    "id": next_id("contact", "CON", 5),
                    "customer_id": cid,
                    "name": f"{cf} {cl}",
                    "email": f"{cf.lower()}.{cl.lower()}@{domain}",
                    "role": rng.choice(_CONTACT_ROLES),
                    "phone": f"+1-555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}",
                    "is_primary": 0,
                }
            )
        for _ in range(rng.randint(0, 4)):
            category, subject = rng.choice(_TICKETS)
            opened = ANCHOR - timedelta(days=rng.randint(0, 120), hours=rng.randint(0, 23))
            month = opened.strftime("%B")
            crm["crm_tickets"].append(
                {
                    "id": next_id("ticket", "TCK", 5),
                    "customer_id": cid,
                    "subject": subject.format(month=month),
                    "status": rng.choices(["open", "pending", "closed"], weights=[3, 2, 6])[0],
                    "priority": rng.choices(["low", "normal", "high", "urgent"], [3, 6, 2, 1])[0],
                    "category": category,
                    "created_at": opened,
                    "updated_at": opened + timedelta(hours=rng.randint(1, 96)),
                }
            )
        for _ in range(rng.randint(2, 6)):
            channel, summary = rng.choice(_INTERACTIONS)
            crm["crm_interactions"].append(
                {
                    "id": next_id("interaction", "INT", 6),
                    "customer_id": cid,
                    "channel": channel,
                    "summary": summary,
                    "agent": rng.choice(_AGENTS),
                    "occurred_at": ANCHOR
                    - timedelta(days=rng.randint(0, 180), minutes=rng.randint(0, 600)),
                }
            )

        # --- billing ---------------------------------------------------------------------
        brand = rng.choice(_CARD_BRANDS)
        method = f"{brand} ending {rng.randint(1000, 9999)}"
        billing["billing_accounts"].append(
            {
                "customer_id": cid,
                "name": name,
                "email": email,
                "currency": currency,
                "payment_method": method,
                "credit_balance_cents": rng.choice([0, 0, 0, 0, 500, 1500, 2500]),
            }
        )
        price_cents = int(PLANS[plan]["price"]) * 100
        previous_plan: str | None = None
        changed_at: datetime | None = None
        change_month: int | None = None
        idx = _PLAN_ORDER.index(plan)
        if n == 3 or (n > 3 and idx > 0 and rng.random() < 0.15):
            previous_plan = _PLAN_ORDER[idx - 1]
            change_month = 0 if n == 3 else rng.randint(0, MONTHS_OF_INVOICES - 2)
            changed_at = _month_start(ANCHOR, change_month) + timedelta(days=rng.randint(8, 20))
        sub_status = "cancelled" if status == "churned" else "active"
        sub_id = f"SUB-{n:04d}"
        invoice_rows: list[dict[str, Any]] = []
        for back in range(MONTHS_OF_INVOICES - 1, -1, -1):
            period = _month_start(ANCHOR, back)
            if period < created:
                continue
            if status == "churned" and back == 0:
                continue
            month_plan = plan
            if previous_plan is not None and change_month is not None and back > change_month:
                month_plan = previous_plan
            if previous_plan is not None and change_month is not None and back == change_month:
                month_plan = previous_plan
            amount = int(PLANS[month_plan]["price"]) * 100
            invoice_rows.append(
                {
                    "description": f"Lumen {month_plan} plan, {period.strftime('%B %Y')}",
                    "amount_cents": amount,
                    "issued_at": period,
                }
            )
            if previous_plan is not None and back == change_month and changed_at is not None:
                days_left = 30 - changed_at.day
                diff = (price_cents - int(PLANS[previous_plan]["price"]) * 100) * days_left // 30
                invoice_rows.append(
                    {
                        "description": f"Proration: {previous_plan} to {plan} "
                        f"({days_left} days of {period.strftime('%B %Y')})",
                        "amount_cents": diff,
                        "issued_at": changed_at,
                    }
                )
        final = len(invoice_rows) - 1
        for i, inv in enumerate(invoice_rows):
            inv_id = next_id("invoice", "INV", 5)
            issued: datetime = inv["issued_at"]
            roll = rng.random()
            scenario = "paid"
            if n == 1 and i == final:
                scenario = "double"
            elif n == 2 and i == final:
                scenario = "failed"
            elif n > 3 and roll < 0.04:
                scenario = "double"
            elif n > 3 and roll < 0.09:
                scenario = "failed_then_paid"
            elif n > 3 and roll < 0.15 and i == final:
                scenario = "failed"
            pay_time = issued + timedelta(hours=rng.randint(1, 6))
            outcomes: list[tuple[str, datetime, str | None]] = []
            if scenario in ("failed", "failed_then_paid"):
                outcomes.append(("failed", pay_time, rng.choice(_FAILURES)))
            if scenario == "failed_then_paid":
                outcomes.append(("succeeded", pay_time + timedelta(days=3), None))
            if scenario in ("paid", "double"):
                outcomes.append(("succeeded", pay_time, None))
            if scenario == "double":
                late = pay_time + timedelta(minutes=rng.randint(1, 50))
                outcomes.append(("succeeded", late, None))
            payments = [
                {
                    "id": next_id("payment", "PAY", 6),
                    "invoice_id": inv_id,
                    "customer_id": cid,
                    "amount_cents": inv["amount_cents"],
                    "status": pay_status,
                    "method": method,
                    "failure_reason": reason,
                    "created_at": at,
                }
                for pay_status, at, reason in outcomes
            ]
            billing["billing_invoices"].append(
                {
                    "id": inv_id,
                    "customer_id": cid,
                    "description": inv["description"],
                    "amount_cents": inv["amount_cents"],
                    "currency": currency,
                    "status": "open" if scenario == "failed" else "paid",
                    "refunded_cents": 0,
                    "issued_at": issued,
                    "due_at": issued + timedelta(days=14),
                }
            )
            billing["billing_payments"].extend(payments)
            if scenario == "failed" and i == final and sub_status == "active":
                sub_status = "past_due"
        if sub_status == "past_due":
            crm["crm_accounts"][-1]["status"] = "past_due"
        billing["billing_subscriptions"].append(
            {
                "id": sub_id,
                "customer_id": cid,
                "plan": plan,
                "status": sub_status,
                "price_cents": price_cents,
                "interval": "month",
                "started_at": created,
                "current_period_end": _month_start(ANCHOR, -1),
                "previous_plan": previous_plan,
                "plan_changed_at": changed_at,
            }
        )
    return DemoDataset(crm=crm, billing=billing, articles=build_articles())
