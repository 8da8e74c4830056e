"""The help-center articles of the demo data set (Lumen, a team work-management SaaS).

Written by hand where the policy matters (billing, refunds, security) and generated from
templates where articles share a shape (plans, integrations, error codes, regional tax),
so the corpus is varied but deterministic: article ids never change between builds.
"""

from __future__ import annotations

from typing import Any

from services.tools.adapters.kb import Article

PLANS: dict[str, dict[str, Any]] = {
    "Starter": {
        "price": 19,
        "seats": 5,
        "storage": "20 GB",
        "projects": "10 active projects",
        "support": "email support with a 2-business-day response target",
        "extras": "task lists, boards, file sharing and the mobile apps",
        "for": "freelancers and small teams getting organised",
    },
    "Growth": {
        "price": 49,
        "seats": 25,
        "storage": "250 GB",
        "projects": "unlimited projects",
        "support": "email and chat support with a 1-business-day response target",
        "extras": "timelines (Gantt), automations (1,000 runs a month) and guest access",
        "for": "growing teams that plan work across several projects",
    },
    "Business": {
        "price": 129,
        "seats": 100,
        "storage": "1 TB",
        "projects": "unlimited projects and portfolios",
        "support": "priority chat and phone support with a 4-hour response target",
        "extras": "SAML single sign-on, audit logs, advanced permissions and 25,000 automation "
        "runs a month",
        "for": "departments that need security controls and reporting",
    },
    "Enterprise": {
        "price": 499,
        "seats": 1000,
        "storage": "unlimited storage",
        "projects": "unlimited projects, portfolios and workspaces",
        "support": "a named customer success manager and a 1-hour response target for "
        "urgent issues",
        "extras": "SCIM provisioning, data residency (EU or US), a 99.95% uptime SLA and "
        "unlimited automations",
        "for": "large organisations with compliance and scale requirements",
    },
}

_HANDWRITTEN: list[tuple[str, str, str, tuple[str, ...]]] = [
    # (title, category, body, tags)
    (
        "Refund policy",
        "billing",
        "Lumen refunds monthly subscriptions in full when you cancel within 14 days of a "
        "charge. Annual plans can be refunded pro rata for the unused months within the "
        "first 30 days. Refunds go back to the original payment method and take 5 to 10 "
        "business days to appear on your statement. Usage-based add-ons such as extra "
        "automation runs are not refundable once consumed. Support agents can issue a "
        "refund on request; you will receive a confirmation email with the refund id.",
        ("refund", "money back", "cancel"),
    ),
    (
        "I was charged twice for the same invoice",
        "billing",
        "A double charge happens when a payment is retried by your bank or when a card "
        "payment and a manual payment both settle for the same invoice. Check your billing "
        "history: the invoice will show two successful payments. The duplicate payment is "
        "refunded in full to the original card, usually within 5 to 10 business days. A "
        "pending authorisation that disappears after a few days is not a double charge. "
        "Contact support with the invoice number and we will refund the duplicate the same "
        "day.",
        ("duplicate charge", "charged twice", "double billing"),
    ),
    (
        "Why did my payment fail?",
        "billing",
        "Card payments fail most often because the card expired, the bank declined the "
        "transaction, the card has insufficient funds, or 3-D Secure authentication was not "
        "completed. Lumen retries a failed payment automatically after 3, 5 and 7 days. "
        "Update your card under Settings > Billing > Payment method and click Retry payment "
        "to settle the open invoice immediately. If your bank keeps declining, ask it to "
        "allow recurring charges from Lumen.",
        ("declined", "payment failed", "card declined"),
    ),
    (
        "What happens when an invoice stays unpaid (dunning)",
        "billing",
        "When a payment fails your account becomes past due and we email the billing "
        "contacts. After three failed retries over 14 days the workspace switches to "
        "read-only: you can still see and export your data but cannot create new work. "
        "After 30 days unpaid the subscription is cancelled and the workspace is kept for "
        "90 days before deletion. Paying the open invoice at any point restores full "
        "access within minutes.",
        ("past due", "unpaid", "read-only", "suspended"),
    ),
    (
        "Updating your credit card or payment method",
        "billing",
        "Owners and billing admins can change the payment method under Settings > Billing > "
        "Payment method. Lumen accepts Visa, Mastercard, American Express and SEPA direct "
        "debit; Enterprise plans can pay by bank transfer against an invoice. The new card "
        "is used for the next charge and for retrying any open invoice. We never store full "
        "card numbers; they are held by our payment processor.",
        ("credit card", "payment method", "card update", "sepa"),
    ),
    (
        "Downloading invoices and receipts",
        "billing",
        "Every charge produces a PDF invoice and a receipt. Find them under Settings > "
        "Billing > Invoices, where you can download each one or export the whole history as "
        "CSV. Invoices show your company name, address and tax id if you added them before "
        "the charge. To send invoices to your finance team automatically, add their email as "
        "a billing contact.",
        ("invoice pdf", "receipt", "billing history"),
    ),
    (
        "Changing plans: how proration works",
        "billing",
        "When you upgrade in the middle of a billing period, Lumen charges the difference "
        "for the remaining days right away as a proration invoice, and the next regular "
        "invoice is at the new price. When you downgrade, the unused part of the more "
        "expensive plan becomes account credit that pays future invoices; nothing is "
        "refunded to your card. Seat changes are prorated the same way.",
        ("proration", "prorated", "plan change", "upgrade charge"),
    ),
    (
        "Account credit and how it is applied",
        "billing",
        "Account credit comes from downgrades, service-level credits and goodwill credits "
        "issued by support. Credit is applied automatically to your next invoices before "
        "your card is charged, and it never expires while the subscription is active. "
        "Credit cannot be withdrawn as cash. Your current credit balance is shown under "
        "Settings > Billing.",
        ("credit balance", "goodwill", "service credit"),
    ),
    (
        "Cancelling your subscription",
        "account",
        "Owners can cancel under Settings > Billing > Cancel subscription. The workspace "
        "stays fully usable until the end of the period you paid for; after that it becomes "
        "read-only and is deleted after 90 days. Export your data before then. If you "
        "cancel within 14 days of a monthly charge you can ask for a refund of that charge.",
        ("cancel", "close account", "stop subscription"),
    ),
    (
        "Monthly versus annual billing",
        "billing",
        "Annual billing costs the same as ten months of monthly billing, so you get two "
        "months free. Annual plans are charged up front and renew automatically; we email "
        "a reminder 30 days before renewal. You can switch from monthly to annual at any "
        "time (the unused monthly period is prorated) and from annual to monthly at renewal.",
        ("annual", "yearly", "discount", "renewal"),
    ),
    (
        "Sales tax, VAT and adding your tax ID",
        "billing",
        "Lumen charges VAT or sales tax where the law requires it, based on your billing "
        "address. Businesses in the EU and UK can add a valid VAT number under Settings > "
        "Billing > Tax ID so that the reverse charge applies and no VAT is added. Tax ids "
        "added after an invoice was issued do not change that invoice; ask support to "
        "re-issue it.",
        ("vat", "tax id", "reverse charge", "sales tax"),
    ),
    (
        "Paying in a different currency",
        "billing",
        "Subscriptions are billed in US dollars, euros or British pounds, chosen from your "
        "billing country when you subscribe. The currency cannot be changed on an active "
        "subscription; support can move you to a new subscription in another currency at "
        "your next renewal. Your bank may add foreign-exchange fees when the card currency "
        "differs.",
        ("currency", "euro", "pounds", "exchange"),
    ),
    (
        "Adding and removing seats",
        "account",
        "Each member of your workspace uses a paid seat; guests on Growth and above are "
        "free. Add seats under Settings > Members; the extra seats are prorated for the "
        "rest of the billing period. Removing a member frees the seat, and the seat count "
        "is lowered at the next renewal. Each plan has a maximum number of seats.",
        ("seats", "licenses", "members", "users"),
    ),
    (
        "Resetting your password",
        "troubleshooting",
        "Click Forgot password on the sign-in page and enter your work email; the reset "
        "link is valid for one hour. If the email does not arrive, check spam and make sure "
        "your company's mail filter allows no-reply@lumen.example. Accounts that sign in "
        "with SSO cannot reset a Lumen password: reset it with your identity provider.",
        ("password", "forgot password", "reset link"),
    ),
    (
        "I can't log in",
        "troubleshooting",
        "First check that you use the email your workspace invited and that Caps Lock is "
        "off. After 10 failed attempts the account is locked for 15 minutes. Clear cookies "
        "for lumen.example or try a private window if the page keeps reloading. If your "
        "workspace enforces SSO, use Sign in with SSO. Still stuck: an owner can see your "
        "member status under Settings > Members.",
        ("login", "sign in", "locked out", "account locked"),
    ),
    (
        "Two-factor authentication: setup and recovery",
        "troubleshooting",
        "Turn on two-factor authentication under Profile > Security with any authenticator "
        "app. Save the ten recovery codes shown at setup; each works once. If you lost your "
        "phone, sign in with a recovery code and set up 2FA again. Without codes, a "
        "workspace owner can reset your 2FA, or support can after verifying your identity.",
        ("2fa", "two-factor", "authenticator", "recovery codes", "mfa"),
    ),
    (
        "Setting up SAML single sign-on",
        "troubleshooting",
        "SAML SSO is available on Business and Enterprise. In Settings > Security > SSO, "
        "copy the ACS URL and entity id into your identity provider (Okta, Azure AD, Google "
        "Workspace), then paste the IdP metadata URL back into Lumen. Test with one user "
        "before enforcing SSO for everyone. The most common error, an invalid audience, "
        "means the entity id in the IdP does not match Lumen's exactly.",
        ("sso", "saml", "okta", "azure ad", "identity provider"),
    ),
    (
        "Exporting your data",
        "account",
        "Owners can export the whole workspace under Settings > Data > Export as JSON or "
        "CSV, including projects, tasks, comments and attachments. Large exports are "
        "prepared in the background and a download link is emailed when ready; the link "
        "expires after 7 days. Single projects can be exported as CSV from the project "
        "menu.",
        ("export", "backup", "download data", "csv"),
    ),
    (
        "Deleting your workspace and your personal data",
        "account",
        "An owner can delete the workspace under Settings > Data > Delete workspace after "
        "cancelling the subscription. Deletion is permanent after a 14-day grace period. "
        "To delete only your own personal data under GDPR, email privacy@lumen.example; we "
        "answer within 30 days.",
        ("gdpr", "delete account", "privacy", "erase"),
    ),
    (
        "Lumen is slow or pages load slowly",
        "troubleshooting",
        "Check status.lumen.example for incidents first. Very large boards (over 5,000 "
        "tasks) load faster in list view or with filters. Browser extensions that inject "
        "scripts, especially ad blockers and grammar checkers, slow the editor; try a "
        "private window. Clearing the cache under Profile > Advanced > Reset local data "
        "fixes stale offline data.",
        ("slow", "performance", "loading", "lag"),
    ),
    (
        "Notifications and emails are not arriving",
        "troubleshooting",
        "Check Profile > Notifications: email notifications can be off per project. Ask "
        "your IT team to allow mail from notifications@lumen.example and to add our SPF "
        "records. Mobile push notifications need permission in the phone's settings. "
        "Digest emails are sent once a day at 8:00 in your profile's time zone.",
        ("notifications", "email not received", "push", "spam"),
    ),
    (
        "Uploading files fails",
        "troubleshooting",
        "Single files can be up to 250 MB on Starter and 5 GB on other plans. An upload "
        "that stops at 99% is usually blocked by a proxy or antivirus scanning HTTPS "
        "traffic; try another network. When the workspace storage is full, uploads are "
        "refused until you delete files or upgrade to a plan with more storage.",
        ("upload", "attachments", "storage full", "file size"),
    ),
    (
        "The mobile app crashes or will not sync",
        "troubleshooting",
        "Update the Lumen app to the latest version from the App Store or Google Play; we "
        "support the two latest major versions of iOS and Android. If the app crashes on "
        "start, sign out, reinstall and sign in again. Offline changes sync when the "
        "connection returns; a red cloud icon marks items that failed to sync.",
        ("mobile app", "ios", "android", "crash", "offline sync"),
    ),
    (
        "Supported browsers",
        "troubleshooting",
        "Lumen supports the latest two versions of Chrome, Firefox, Safari and Edge. "
        "Internet Explorer is not supported. JavaScript and cookies must be enabled. If "
        "something looks broken in a supported browser, update it and disable extensions "
        "before contacting support.",
        ("browser", "chrome", "safari", "firefox", "edge"),
    ),
    (
        "API rate limits",
        "troubleshooting",
        "The REST API allows 100 requests per minute per token on Starter and Growth and "
        "1,000 per minute on Business and Enterprise. When you exceed the limit the API "
        "answers 429 Too Many Requests with a Retry-After header; wait that many seconds "
        "before retrying. Use webhooks instead of polling to stay under the limit.",
        ("api", "429", "rate limit", "throttling"),
    ),
    (
        "Webhooks are not being delivered",
        "troubleshooting",
        "Lumen sends webhooks as HTTPS POST requests and expects a 2xx answer within 10 "
        "seconds. Failed deliveries are retried with backoff for 24 hours, after which the "
        "webhook is disabled and the owner is emailed. Check the delivery log under "
        "Settings > Developers > Webhooks, verify the signature secret, and re-enable the "
        "webhook once your endpoint answers.",
        ("webhooks", "callbacks", "delivery failed"),
    ),
    (
        "Creating and revoking API tokens",
        "account",
        "Personal API tokens are created under Profile > Developers and inherit your "
        "permissions. Workspace tokens for integrations can be created by owners under "
        "Settings > Developers. Tokens are shown once; store them in a secret manager. "
        "Revoke a leaked token immediately: requests with it fail from that moment.",
        ("api token", "api key", "revoke", "developer"),
    ),
    (
        "Roles and permissions",
        "account",
        "Workspaces have owners, admins, members and guests. Owners manage billing and can "
        "delete the workspace; admins manage members and settings; members work in the "
        "projects they belong to; guests see only the projects they are invited to. "
        "Business and Enterprise add custom project-level permissions.",
        ("roles", "permissions", "admin", "owner", "guest"),
    ),
    (
        "Transferring workspace ownership",
        "account",
        "The current owner can make another admin the owner under Settings > Members > "
        "Transfer ownership. If the owner has left the company, a billing admin can ask "
        "support to transfer ownership after we verify the request from the company "
        "domain. The billing contact does not change automatically.",
        ("ownership", "owner left", "transfer"),
    ),
    (
        "Automations stopped running",
        "troubleshooting",
        "Automations pause when the workspace reaches its monthly run quota (1,000 on "
        "Growth, 25,000 on Business, unlimited on Enterprise); the quota resets on the "
        "first day of each month. An automation also stops when the user who created it "
        "is removed. Open Settings > Automations to see the run history and error for "
        "each rule.",
        ("automation", "rules", "quota", "workflow"),
    ),
    (
        "Service status and the uptime SLA",
        "plans",
        "Current incidents and maintenance windows are on status.lumen.example, where you "
        "can subscribe to updates. Enterprise plans include a 99.95% monthly uptime SLA: "
        "when uptime falls below it, the customer receives a service credit of 10% of the "
        "monthly fee for each 0.5% below target, requested within 30 days.",
        ("status page", "outage", "downtime", "sla", "uptime"),
    ),
    (
        "Nonprofit and education discounts",
        "plans",
        "Registered nonprofits and accredited schools get 50% off Growth and Business "
        "plans. Apply from Settings > Billing > Discounts with proof of status; the "
        "discount applies from the next invoice once approved and is reviewed every year. "
        "Discounts do not stack with other promotions.",
        ("discount", "nonprofit", "education", "charity"),
    ),
    (
        "Free trial: what happens when it ends",
        "plans",
        "New workspaces get a 14-day free trial of the Business plan with no card "
        "required. When the trial ends without a plan, the workspace moves to read-only; "
        "choose a plan and add a card to continue. Nothing is charged automatically at the "
        "end of a trial.",
        ("trial", "free trial", "trial ended"),
    ),
]

_INTEGRATIONS: list[tuple[str, str, str]] = [
    # (name, what it does, the usual fix)
    (
        "Slack",
        "posts task updates to channels and creates tasks from messages",
        "reconnect the Slack app under Settings > Integrations after a Slack admin "
        "approves it, and invite the Lumen bot to private channels",
    ),
    (
        "Google Drive",
        "attaches Drive files to tasks with live previews",
        "sign in again with the Google account that owns the files; shared drives need "
        "the Drive admin to allow third-party apps",
    ),
    (
        "Microsoft Teams",
        "adds Lumen tabs to Teams channels and sends notifications",
        "ask your Microsoft 365 admin to grant tenant-wide consent, then remove and "
        "re-add the Lumen tab",
    ),
    (
        "Salesforce",
        "creates Lumen projects from won opportunities and syncs their status",
        "make sure the connected Salesforce user has API access and the Lumen managed "
        "package is on the latest version; sync runs every 15 minutes",
    ),
    (
        "GitHub",
        "links commits and pull requests to tasks and closes tasks on merge",
        "mention the task key (for example LUM-123) in the branch name or pull request "
        "title and check the GitHub app is installed on the repository",
    ),
    (
        "Zapier",
        "connects Lumen to thousands of apps with triggers and actions",
        "reconnect the Lumen account in Zapier after rotating API tokens and check the "
        "Zap history for 429 rate-limit errors",
    ),
    (
        "Jira",
        "imports Jira projects and keeps issues and tasks in two-way sync",
        "give the Jira integration user browse and edit permissions on the project; "
        "custom fields must be mapped again after they are renamed",
    ),
    (
        "Google Calendar",
        "shows task due dates in calendars and turns events into tasks",
        "re-authorise calendar access; only due dates with a time appear as events, and "
        "changes can take up to 10 minutes to show",
    ),
]

_ERROR_CODES: list[tuple[str, str, str]] = [
    # (code, meaning, what to do)
    (
        "E101",
        "the session expired or the sign-in token is invalid",
        "sign out, clear cookies for lumen.example and sign in again",
    ),
    (
        "E204",
        "the workspace is read-only because an invoice is past due",
        "an owner or billing admin pays the open invoice under Settings > Billing",
    ),
    (
        "E310",
        "the file exceeds the upload size limit of your plan",
        "compress the file, split it, or upgrade to a plan with a higher limit",
    ),
    (
        "E402",
        "the payment could not be authorised by the card issuer",
        "update the card or ask the bank to approve the charge, then retry the payment",
    ),
    (
        "E429",
        "too many requests were made with one API token",
        "wait for the time in the Retry-After header and reduce polling",
    ),
    (
        "E503",
        "a Lumen service is temporarily unavailable",
        "retry after a minute and check status.lumen.example for incidents",
    ),
    (
        "E611",
        "the SSO assertion was rejected (wrong audience or expired certificate)",
        "compare the entity id in your identity provider with Lumen's and renew the "
        "signing certificate",
    ),
    (
        "E720",
        "the seat limit of the plan was reached while inviting members",
        "remove inactive members or add seats; the maximum depends on the plan",
    ),
]

_TAX_REGIONS: list[tuple[str, str]] = [
    (
        "United Kingdom",
        "UK customers pay 20% VAT unless they add a UK VAT number, which applies the "
        "reverse charge. Invoices show Lumen's UK VAT registration.",
    ),
    (
        "European Union",
        "EU businesses with a valid VAT number validated against VIES pay no VAT (reverse "
        "charge); consumers and businesses without a number pay their country's VAT rate.",
    ),
    (
        "United States",
        "US sales tax is charged in states where software subscriptions are taxable, based "
        "on the billing address; tax-exempt organisations can upload an exemption "
        "certificate.",
    ),
    (
        "Canada",
        "Canadian customers pay GST or HST, plus QST in Quebec, unless they provide a "
        "business number registered for GST.",
    ),
    (
        "Australia",
        "Australian customers pay 10% GST; businesses that provide an ABN registered for "
        "GST are invoiced without it.",
    ),
    (
        "India",
        "Indian customers pay 18% GST on digital services; businesses can add a GSTIN so "
        "that the reverse charge applies.",
    ),
]


def _plan_articles() -> list[tuple[str, str, str, tuple[str, ...]]]:
    out: list[tuple[str, str, str, tuple[str, ...]]] = []
    names = list(PLANS)
    for i, (name, p) in enumerate(PLANS.items()):
        out.append(
            (
                f"The {name} plan: price, limits and features",
                "plans",
                f"The {name} plan costs ${p['price']} per month billed monthly, or "
                f"${int(p['price']) * 10} per year billed annually. It is built for "
                f"{p['for']}. It includes up to {p['seats']} seats, {p['storage']} of storage "
                f"and {p['projects']}. You also get {p['extras']}. Support: {p['support']}.",
                (name.lower(), "pricing", "plan limits"),
            )
        )
        if i + 1 < len(names):
            higher = names[i + 1]
            hp = PLANS[higher]
            out.append(
                (
                    f"Upgrading from {name} to {higher}",
                    "plans",
                    f"Upgrade from {name} to {higher} under Settings > Billing > Change plan; "
                    f"the new features are available immediately. {higher} raises the seat "
                    f"limit from {p['seats']} to {hp['seats']} and storage from "
                    f"{p['storage']} to {hp['storage']}, and adds {hp['extras']}. You pay "
                    "the prorated difference for the rest of the current period today. "
                    f"Moving back down to {name} later turns the unused difference into "
                    "account credit.",
                    (name.lower(), higher.lower(), "upgrade", "change plan"),
                )
            )
    out.append(
        (
            "Downgrading to a smaller plan",
            "plans",
            "Owners can downgrade under Settings > Billing > Change plan. The downgrade takes "
            "effect immediately and the unused part of the current period becomes account "
            "credit. Features of the higher plan stop working: SSO is switched off when "
            "leaving Business, automations pause above the new quota, and you must remove "
            "members first when the new plan has fewer seats than you use.",
            ("downgrade", "smaller plan", "change plan"),
        )
    )
    out.append(
        (
            "Comparing the Lumen plans",
            "plans",
            "Starter ($19 a month) suits small teams with up to 5 seats. Growth ($49) adds "
            "timelines, automations and guests for up to 25 seats. Business ($129) adds SAML "
            "SSO, audit logs and priority support for up to 100 seats. Enterprise ($499) "
            "adds SCIM, data residency, an uptime SLA and a named success manager. All "
            "plans are two months cheaper when billed annually.",
            ("compare plans", "which plan", "pricing"),
        )
    )
    return out


def _integration_articles() -> list[tuple[str, str, str, tuple[str, ...]]]:
    return [
        (
            f"Troubleshooting the {name} integration",
            "integrations",
            f"The {name} integration {what}. When it stops working, the usual cause is an "
            f"expired authorisation or missing permissions on the {name} side: {fix}. "
            f"Integration errors are listed under Settings > Integrations > {name} > Activity. "
            "Disconnecting and reconnecting keeps your existing links.",
            (name.lower(), "integration", "sync not working"),
        )
        for name, what, fix in _INTEGRATIONS
    ]


def _error_articles() -> list[tuple[str, str, str, tuple[str, ...]]]:
    return [
        (
            f"Error {code}: what it means",
            "troubleshooting",
            f"Error {code} means {meaning}. To fix it, {fix}. If error {code} keeps "
            "appearing, send support the time it happened and your workspace URL.",
            (code.lower(), "error code", "error message"),
        )
        for code, meaning, fix in _ERROR_CODES
    ]


def _tax_articles() -> list[tuple[str, str, str, tuple[str, ...]]]:
    return [
        (
            f"Taxes on invoices in {region}",
            "billing",
            f"{rule} The tax rate and tax id appear on each invoice. Change your billing "
            "address under Settings > Billing > Company details before the next charge to "
            "change which rules apply.",
            (region.lower(), "tax", "vat", "gst"),
        )
        for region, rule in _TAX_REGIONS
    ]


def build_articles() -> list[Article]:
    """All articles, with stable ids KB-1001, KB-1002, ... in a fixed order."""
    rows = [
        *_HANDWRITTEN,
        *_plan_articles(),
        *_integration_articles(),
        *_error_articles(),
        *_tax_articles(),
    ]
    return [
        Article(article_id=f"KB-{1001 + i}", title=title, body=body, category=category, tags=tags)
        for i, (title, category, body, tags) in enumerate(rows)
    ]
