// The console's few behaviours of its own (the theme brings Alpine.js for the rest).

// A proxy key as GPT-Load's generator makes them: "sk-" and 48 random characters.
function gptloadAddProxyKey(fieldId) {
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  const bytes = crypto.getRandomValues(new Uint8Array(48));
  const key = "sk-" + Array.from(bytes, (b) => alphabet[b % alphabet.length]).join("");
  const field = document.getElementById(fieldId);
  const keys = field.value.split(",").map((k) => k.trim()).filter(Boolean);
  keys.push(key);
  field.value = keys.join(",");
}

// Copies a field's text (the group's proxy keys) and says so on the button.
async function gptloadCopyField(fieldId, button) {
  const text = document.getElementById(fieldId).value.trim();
  if (!text) return;
  await navigator.clipboard.writeText(text).catch(() => {});
  button.querySelector(".material-symbols-outlined").textContent = "done";
}

// Asks the server for one key in plaintext, shows it in place and copies it.
async function gptloadReveal(button) {
  const csrf = document.cookie.split("; ").find((c) => c.startsWith("csrftoken="));
  const answer = await fetch(button.dataset.reveal, {
    method: "POST", headers: { "X-CSRFToken": csrf ? csrf.split("=")[1] : "" },
  });
  const body = await answer.json();
  const shown = button.previousElementSibling;
  if (!answer.ok) { shown.textContent = body.error || answer.statusText; return; }
  shown.textContent = body.key;
  await navigator.clipboard.writeText(body.key).catch(() => {});
  button.textContent = "done";
}

// A key job's page follows its progress until it ends.
function gptloadFollowJob(url) {
  const bar = document.getElementById("job-bar");
  const label = document.getElementById("job-label");
  const tick = async () => {
    const answer = await fetch(url, { headers: { Accept: "application/json" } });
    if (!answer.ok) return;
    const job = (await answer.json()).data;
    const share = job.total ? Math.floor((100 * job.processed) / job.total) : job.is_running ? 0 : 100;
    bar.style.width = share + "%";
    label.textContent = `${job.processed} / ${job.total} · ${job.status}`;
    if (job.is_running) setTimeout(tick, 700);
    else setTimeout(() => window.location.reload(), 400);
  };
  tick();
}

// The group form: picking a channel fills in its default upstream and test model where the
// operator left them empty or at another channel's default.
function gptloadChannelDefaults() {
  const channel = document.querySelector("select[name=channel_type][data-defaults]");
  if (!channel) return;
  const defaults = JSON.parse(channel.dataset.defaults);
  const isDefault = (value, field) =>
    !value || Object.values(defaults).some((d) => d[field] === value);
  channel.addEventListener("change", () => {
    const chosen = defaults[channel.value];
    if (!chosen) return;
    const model = document.querySelector("input[name=test_model]");
    if (model && isDefault(model.value.trim(), "test_model")) model.value = chosen.test_model;
    const editor = document.querySelector('[data-rows-for="upstreams"]');
    if (!editor || !window.Alpine) return;
    const rows = window.Alpine.$data(editor).rows;
    if (!rows.length) rows.push({ url: chosen.upstream, weight: 1 });
    else if (isDefault(rows[0].url.trim(), "upstream")) rows[0].url = chosen.upstream;
  });
}
if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", gptloadChannelDefaults);
else gptloadChannelDefaults();
